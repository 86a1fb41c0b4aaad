"""Train the paper's convolutional VAE (section 5.2): on MNIST with an IAF or diagonal posterior, or
the ResNet VAE with IAF on CIFAR-10.

    python scripts/train_vae.py --config configs/paper/vae_mnist.yaml --download
    python scripts/train_vae.py --config configs/paper/vae_cifar10.yaml parameterization=normal

Rerunning the same command resumes an interrupted run from its newest checkpoint (--force: even with a
changed config); SIGINT/SIGTERM write a checkpoint and exit with 130/143. A checkpoint or log that
cannot be written (a full disk) exits with 1 and a message naming the file; the previous checkpoint is intact.
A bad config or a missing dataset exits with 2 and one line saying what to fix; 75 when another process
trains the same run (it holds the run folder's .trainer.lock): wait for it or stop it.
"""

from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError
from wn_rl.models.cli import exit_on_error, parse_training_command
from wn_rl.models.generative_experiment import GenerativeConfig, train_generative

if __name__ == "__main__":
    brief_warnings()
    config, force = parse_training_command(GenerativeConfig, "configs/paper/vae_mnist.yaml", __doc__)
    with exit_on_error():
        if config.model not in ("conv_vae", "resnet_vae"):
            raise ConfigError(
                f"model={config.model!r}: this script trains conv_vae or resnet_vae (DRAW: train_draw.py)"
            )
        result = train_generative(config, force=force)
    print(f"final test bound {result.test_bound[-1]:.3f} nats ({result.test_bits_per_dim[-1]:.4f} bits/dim)")
