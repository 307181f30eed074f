from setuptools import setup

# kernels/ and profiling/ live at the top level of the repo but install as subpackages of
# dtql_fast: a top-level package called `kernels` would collide with the PyPI package of that name.
setup(
    name="dtql_fast",
    version="0.1.0",
    description="A fast, verified trainer for Diffusion Trusted Q-Learning (offline RL)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dtql_fast", "dtql_fast.kernels", "dtql_fast.profiling"],
    package_dir={"dtql_fast": "dtql_fast", "dtql_fast.kernels": "kernels",
                 "dtql_fast.profiling": "profiling"},
    package_data={"dtql_fast": ["assets/*.pt", "assets/*.json"]},
    install_requires=[
        # Pin nothing that would drag a CUDA torch in: install torch first (see README).
        "torch>=2.5",
        'triton>=3.2; platform_system == "Linux"',
        "numpy",
        "gymnasium[mujoco]>=1.0",
        "mujoco>=3.0",
        "minari>=0.5",
        "h5py",
        "nvtx",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # The tests run sweeps on a local Ray (no dashboard needed); `sweep` adds Ray's dashboard.
        "test": ["pytest", "ray==2.60.0", "tensorboard", "wandb"],
        "tensorboard": ["tensorboard"],
        "track": ["wandb"],
        "sweep": ["ray[default]==2.60.0"],
        "robotics": ["gymnasium-robotics>=1.2"],
        "hf": ["minari[hf]"],
        # profiling.learning runs the authors' release from a checkout you supply; einops is its dependency.
        "release": ["einops"],
        # profiling.peer_flowrl imports FlowRL's JAX DTQL from a checkout you supply: the versions it pins.
        "peer": ["jax[cpu]==0.5.3", "flax==0.10.5", "distrax", "optax", "orbax-checkpoint==0.11.23", "omegaconf",
                 "hydra-core"],
    },
)
