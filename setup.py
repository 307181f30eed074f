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
        "test": ["pytest", "ray==2.60.0", "tensorboard", "wandb", "scipy", "hypothesis"],
        "tensorboard": ["tensorboard"],
        "track": ["wandb"],
        "sweep": ["ray[default]==2.60.0"],
        "robotics": ["gymnasium-robotics>=1.2"],
        "hf": ["minari[hf]"],
        # profiling.learning runs the authors' release from a checkout you supply (einops is its dependency);
        # its report's Welch tests use scipy.
        "release": ["einops", "scipy"],
        # profiling.peer_flowrl imports FlowRL's JAX DTQL from a checkout you supply. The peer at its best: the newest
        # JAX its code runs on (what `pip install "jax[cpu]" flax distrax optax orbax-checkpoint hydra-core omegaconf`
        # resolved to on 2026-12-06), not the jax 0.5.3 it pins, under which its update ran about twice as slow.
        "peer": ["jax[cpu]==0.10.2", "flax==0.12.8", "distrax==0.1.9", "optax==0.2.8", "orbax-checkpoint==0.12.8",
                 "omegaconf==2.3.1", "hydra-core==1.3.8"],
        # The docs site (mkdocs.yml, docs/): CI builds it with `mkdocs build --strict`.
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.2"],
    },
)
