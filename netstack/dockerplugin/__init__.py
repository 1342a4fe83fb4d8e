"""Docker engine remote network driver and IPAM driver, served by netstackd."""
