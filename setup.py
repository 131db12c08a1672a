"""postrl: post-training for large language models in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Pinned to what CI installs and tests (CPU). The GPU benchmark machines run newer JAX (0.11.x);
# the code runs on both.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "ml-collections==1.1.0",
    "gguf==0.19.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "jinja2==3.1.6",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "champ-dataset==1.0.0",
]

EXTRAS_REQUIRE = {
    # torch 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
    "test": [
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",  # the README's test command runs the suite on 2 worker processes
        "pytest-timeout==2.4.0",  # pytest.ini: a hung test ends with its stacks, not CI's time limit
        "absl-py==2.5.1",
        "torch==2.13.0",
        "transformers==5.24.0",
        "accelerate==1.15.0",  # transformers needs it to read GGUF files (independent parity check)
        # the standalone Triton compiler: tests/kernels/test_sm90_compile.py compiles every Pallas
        # kernel to Hopper machine code on CPU (benchmarks/triton_offline.py)
        "triton==3.4.0",
    ],
}

setup(
    name="postrl",
    version="0.1.0",
    description="Post-training of large language models in JAX / Flax NNX: losses, trainers, "
                "PEFT, quantization, Pallas kernels and test-time search.",
    packages=find_packages(include=["postrl", "postrl.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
