"""Serve a reward model: `torchrun --nproc_per_node N serve_reward_model.py [hydra overrides]`.

See README.md for the request contract and conf/serve_reward_model.yaml for every setting."""

from reward_server.cli import main

if __name__ == "__main__":
    main()
