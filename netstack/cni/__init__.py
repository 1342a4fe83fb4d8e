"""netstack as a CNI plugin (``"type": "netstack"``): spec, commands, fast entry point."""
