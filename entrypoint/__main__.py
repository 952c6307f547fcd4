from entrypoint.cli import app

app(prog_name="llava-bench")
