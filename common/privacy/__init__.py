"""Privacy accounting (epsilon from the DP-SGD history) and the site ledger that records every spend."""
