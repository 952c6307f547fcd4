"""The command line: each command's options and help, and how results reach the user."""
