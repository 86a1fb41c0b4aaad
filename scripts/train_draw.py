"""Train DRAW with attention on MNIST (section 5.3) in the normal or weight-normalized parameterization.

python scripts/train_draw.py --config configs/paper/draw_mnist.yaml parameterization=normal --download

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
    config, force = parse_training_command(GenerativeConfig, "configs/paper/draw_mnist.yaml", __doc__)
    with exit_on_error():
        if config.model != "draw":
            raise ConfigError(f"model={config.model!r}: this script trains draw (the VAEs: train_vae.py)")
        result = train_generative(config, force=force)
    print(f"final test bound {result.test_bound[-1]:.3f} nats")
