from setuptools import setup

setup(
    name="reward-server",
    version="0.1.0",
    description="Reward model inference server for RLHF: PyTriton on rank 0, torch.distributed model parallelism",
    python_requires=">=3.11",  # subprocess process_group (lifecycle.py)
    packages=["reward_server", "reward_server.client", "reward_server.config", "reward_server.engine", "reward_server.kinds", "reward_server.loading",
              "reward_server.scoring", "reward_server.serving", "reward_server.conf"],
    package_dir={"reward_server.conf": "conf"},
    package_data={"reward_server.conf": ["*.yaml", "*/*.yaml"]},
    py_modules=["serve_reward_model"],
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "accelerate",
        "nvidia-pytriton==0.7.0",
        "numpy<2",
        "hydra-core==1.3.2",
        "tritonclient[all]==2.51.0",
        "prometheus-client>=0.20",
        "aiohttp>=3.8",  # the API port (serving/api.py); tritonclient[all] brings it too
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "requests"],
                    "fp8": ["torchao>=0.18"]},  # model.quantization=fp8: torchao built for your torch (README)
    entry_points={"console_scripts": ["reward-server=reward_server.launcher:main"]},
)
