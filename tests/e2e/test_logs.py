"""Worker stdout and ctx.logger records reach the server's log, labelled with the model."""

import time

from umclient import Inp, decode, infer_json, plugin

MARK = "chatty-e2e-3f9c"  # chatty.MARK


def test_worker_output_is_relabelled_in_the_server_log(start_server):
    server = start_server(plugin("chatty.py"), env={"RUST_LOG": "info"})
    result = decode(infer_json(server, "chatty", [Inp("x", "FP32", [1.0])]))
    assert result.outputs["y"].tolist() == [1.0]

    wanted = [f"{MARK} {what}" for what in ("setup-print", "setup-logger", "predict-print")]
    wanted.append(f"{MARK} predict-logger")
    deadline = time.monotonic() + 10.0
    while True:
        lines = server.log_text().splitlines()
        missing = [
            w
            for w in wanted
            if not any(w in line and "chatty" in line.replace(MARK, "") for line in lines)
        ]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not missing, f"not in the log on a line naming the model: {missing}\n" + "\n".join(
        line for line in lines if MARK in line
    )
    # The worker's structured log records are parsed, not passed through raw.
    assert "\x1eUMLOG" not in server.log_text()
