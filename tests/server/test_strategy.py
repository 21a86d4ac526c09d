"""Reading a failed site's reason out of a ClientApp traceback."""

from server.strategy import root_cause


def test_root_cause_is_the_first_real_exception_line() -> None:
    reason = (
        "ray::ClientAppActor.run()\\n  File x\\ncommon.errors.DataError: /a/site-1.jsonl, line 1: not a JSON ledger line\\n"
        "\\nflwr.clientapp.client_app.ClientAppException: wrapped"
    ).replace("\\n", "\n")
    assert root_cause(reason) == "common.errors.DataError: /a/site-1.jsonl, line 1: not a JSON ledger line"
    assert root_cause("timeout") == "timeout"
