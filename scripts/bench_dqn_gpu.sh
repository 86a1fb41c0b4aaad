#!/usr/bin/env bash
# The native DQN on one GPU (issue #6) and weight norm's overhead per training step there (issue #2), in parts
# that each fit a 10-minute call on a lent GPU machine.
#
#   bash scripts/bench_dqn_gpu.sh PART [OUT_DIR]
#   PART: all | tests | atari | atari-envs | minatar | wn-overhead | wn-overhead-more
#
#   all         the parts below in turn (each part is planned to fit a 10-minute call, not yet timed on a
#               GPU; on the lent machine, whose calls stop at 10 minutes, run the parts one call each)
#   tests       tests/test_dqn_gpu.py (compiled/CUDA-graph runs equal eager, the graph is recorded, no host
#               sync in the updates), then the hardware
#   atari       Atari Breakout, 16 envs, minibatch 64 (issue #6's target settings): eager vs compiled vs CUDA
#               graph, normal vs weight_norm, SB3 beside
#   atari-envs  Atari Breakout, CUDA graph, normal vs weight_norm, 8 and 32 envs, SB3 beside
#   minatar     MinAtar Breakout, 1 and 16 envs: compiled vs CUDA graph, normal vs weight_norm, SB3 beside
#   wn-overhead scripts/bench_wn_overhead.py: one training step, plain vs wn_rl vs PyTorch's weight norm, as one
#               CUDA graph of the whole step (forward, backward, Adam; issue #2's target), then eager; all three cases;
#               then the recurrent case (lstm32) eager
#   wn-overhead-more  the same, Nature CNN only: the whole-step CUDA graph with inductor's combo kernels, the
#               whole step compiled without CUDA graphs, and the compiled forward alone
#
# Results go to OUT_DIR (default: $OUT on the device machine, else ./bench_out): a JSON per run, and for the
# wn-overhead parts one table (wn_overhead.txt) and one log (wn_overhead.log) for all runs. The GPU machine
# lent to sessions has torch but no ale-py, gymnasium, MinAtar or SB3: where
# ale_py is missing the wheels in ./.whl (see the device README) are installed into /tmp/site first (not for
# the wn-overhead parts, which need torch only).
set -euo pipefail
parts="tests atari minatar atari-envs wn-overhead wn-overhead-more"
part=${1:?"usage: bash scripts/bench_dqn_gpu.sh all|${parts// /|} [OUT_DIR]"}
out=${2:-${OUT:-bench_out}}
mkdir -p "$out"
if [ "$part" = all ]; then  # every part, even after one fails (a failed configuration: FAILED in its table)
    status=0
    for each in $parts; do
        bash "$0" "$each" "$out" || { status=$?; echo "part '$each' failed (exit $status)" >&2; }
    done
    exit $status
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case $part in
    wn-overhead*) ;;  # torch alone: no envs
    *)
        if ! python3 -c "import ale_py" 2>/dev/null; then
            ls .whl/*.whl >/dev/null || { echo "ale_py is missing and there are no wheels in ./.whl" >&2; exit 2; }
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl
            export PYTHONPATH=/tmp/site:$PYTHONPATH
        fi
        ;;
esac
wn_overhead() {  # name, then bench_wn_overhead.py's arguments; a failed or timed-out run does not stop the others
    # One JSON per run (rewritten after every case), one shared table and one shared log: few files, since the
    # device machine returns a limited number; each run has its own time limit, so a slow compile costs one run.
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/wn_overhead.txt" "$out/wn_overhead.log"
    timeout "${WN_OVERHEAD_TIMEOUT:-300}" python3 scripts/bench_wn_overhead.py --device cuda --out "$out/$name.json" \
        "$@" 2>> "$out/wn_overhead.log" | tee -a "$out/wn_overhead.txt" || {
        echo "wn_overhead $name failed or timed out (exit ${PIPESTATUS[0]}); the end of wn_overhead.log:" >&2
        tail -n 40 "$out/wn_overhead.log" >&2
        status=1
    }
}
bench() {  # name, then bench_dqn_throughput.py's arguments
    local name=$1
    shift
    python3 scripts/bench_dqn_throughput.py --device cuda --threads 0 --profile --json "$out/$name.json" "$@" \
        2> "$out/$name.log" | tee "$out/$name.txt"
}
case $part in
    tests)
        { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | head -20
          python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; date -u; } \
            > "$out/hardware.txt" 2>&1
        python3 -m pytest -q -p no:cacheprovider tests/test_dqn_gpu.py \
            tests/test_recurrent_stacks.py::test_cuda_stack_runs_cudnn_with_the_effective_weights 2>&1 | tee "$out/tests_gpu.txt"
        ;;
    atari)
        bench atari16 --games atari:breakout --num-envs 16 --batch-size 64 --update-mode eager compiled cudagraph \
            --parameterization normal weight_norm --steps 4000 --rounds 2 --warmup 6000 --learning-starts 4000
        ;;
    atari-envs)
        bench atari_envs --games atari:breakout --num-envs 8 32 --update-mode cudagraph \
            --parameterization normal weight_norm --steps 4000 --rounds 2 --warmup 6000 --learning-starts 4000
        ;;
    minatar)
        bench minatar --games minatar:breakout --num-envs 1 16 --update-mode compiled cudagraph \
            --parameterization normal weight_norm --steps 2000 --rounds 2 --warmup 3000 --learning-starts 2000
        ;;
    wn-overhead)
        status=0
        # the target's measurement first: a call stopped at its limit still returns the lines printed so far
        # (the target gets most of a 10-minute call; each case's results are kept as soon as it is done)
        WN_OVERHEAD_TIMEOUT=450 wn_overhead wn_whole_cudagraph --step whole --compile-mode reduce-overhead --reps 51 \
            --steps 20
        wn_overhead wn_eager --reps 51 --steps 20
        wn_overhead wn_lstm_eager --cases lstm32 --reps 51 --steps 20  # cuDNN's LSTM: WNLSTM's weights vs plain
        exit $status
        ;;
    wn-overhead-more)
        status=0
        wn_overhead wn_whole_cudagraph_combo --step whole --compile-mode reduce-overhead --combo-kernels \
            --cases nature32,nature64 --reps 51 --steps 20
        wn_overhead wn_whole_compiled --step whole --cases nature32,nature64 --reps 51 --steps 20
        wn_overhead wn_compiled_forward --compile --cases nature32,nature64 --reps 51 --steps 20
        exit $status
        ;;
    *)
        echo "unknown part '$part': expected all or one of: $parts" >&2
        exit 2
        ;;
esac
