"""netctl, the command-line front-end."""
