# Hydra configs, installed as the package reward_server.conf (see setup.py).
