"""netstackd: the long-running netstack process (API socket; DNS and more build on it)."""
