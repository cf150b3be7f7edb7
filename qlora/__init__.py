"""The `qlora` command line and what it drives outside a flow: argument parsing and commands (cli),
the local Prefect and MLflow servers it starts (servers), and the registered models it loads,
promotes, exports and chats with (registry). The pipeline itself is in flows/ and tasks/."""
