from entrypoint.cli.app import app

app(prog_name="llava-bench")
