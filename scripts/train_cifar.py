"""Train the paper's CIFAR-10 network (Table 1, section 5.1) in one parameterization.

python scripts/train_cifar.py --config configs/paper/cifar10.yaml parameterization=weight_norm --download

Rerunning the same command resumes an interrupted run from its newest checkpoint (--force: even with a
changed config); SIGINT/SIGTERM write a checkpoint and exit with 130/143. A checkpoint or log that
cannot be written (a full disk) exits with 1 and a message naming the file; the previous checkpoint is intact.
A bad config or a missing dataset exits with 2 and one line saying what to fix; 75 when another process
trains the same run (it holds the run folder's .trainer.lock): wait for it or stop it.
"""

from wn_rl.cli import brief_warnings
from wn_rl.models.cifar_experiment import CifarConfig, train_cifar
from wn_rl.models.cli import exit_on_error, parse_training_command

if __name__ == "__main__":
    brief_warnings()
    config, force = parse_training_command(CifarConfig, "configs/paper/cifar10.yaml", __doc__)
    with exit_on_error():
        result = train_cifar(config, force=force)
    print(f"final test error {result.final_test_error:.4f}; checkpoint {result.checkpoint}")
