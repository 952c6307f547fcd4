"""Launch: the commands the appliance starts, their supervision, signals, diagnosis and the memory retry."""
