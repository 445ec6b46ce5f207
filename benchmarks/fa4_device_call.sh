#!/bin/bash
# The second of the two device calls of ../shared/docs/gpu-notes.md ("Bringing flash-attn-4 to the device"),
# for issue 14's open measurements, most important first, each process under its own time limit so that one
# that hangs or fails leaves the others their time. Run from the repository root on the device, right after
# the first call (`mkdir -p /tmp/fa4 && cp .whl-fa4/part1/* /tmp/fa4/`, carry [".whl-fa4/part1"]):
#     run(carry=[".whl-fa4/part2"], command="bash benchmarks/fa4_device_call.sh")
# Results under $OUT/r: one JSON-lines file per process, its console log, rc.txt (exit codes), t0 (unix
# seconds at each stage), smi.csv (clock, power and clock-event reasons every 250 ms), sha.txt (the sources' sha256:
# the device's checkout may not carry this session's commits).
P=.whl-fa4/part2
S=/tmp/q/site-packages
if [ ! -f /tmp/fa4/libs_cu13.part0 ]; then
    echo "no /tmp/fa4/libs_cu13.part0: the machine went cold, repeat the first call" >&2
    exit 3
fi
W=/tmp/fa4/$(cat $P/libs_cu13.name)
cat /tmp/fa4/libs_cu13.part0 $P/libs_cu13.part1 > "$W" &&
    python3 -m pip install -q --no-index --no-deps --target $S $P/*.whl "$W" || exit 1
export PYTHONPATH=.:$S:$S/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH PYTHONUNBUFFERED=1
R=$OUT/r
mkdir -p "$R"
sha256sum benchmarks/*.py dinov3_packing/*.py dinov3_packing/*/*.py dinov3_packing/*/*/*.py > "$R/sha.txt"
nvidia-smi > "$R/smi0.txt"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv -lms 250 > "$R/smi.csv" &
SMI=$!
START=$(date +%s)
check() {  # name, seconds, then fa4_gpu_check.py's arguments
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 30 ]; then
        echo "$name skipped (${limit}s left)" >> "$R/rc.txt"
        return
    fi
    date +%s >> "$R/t0"
    timeout "$limit" python benchmarks/fa4_gpu_check.py --out "$R/$name.jsonl" "$@" > "$R/$name.log" 2>&1
    echo "$name rc=$? (limit ${limit}s)" >> "$R/rc.txt"
}
# 1. The training step: today's path, the default, fused_norm; HF looped per image; a profile of each.
check train "${TRAIN_S:-300}" --parts train --rounds 5 --systems today,quack-dgelu,norm-fused,hf,profile
# 2. The 2048 px target's kernel: fa4's forward with part of the exponentials emulated (benchmarks/fa4_ex2.py).
check ex2 "${EX2_S:-110}" --parts fa4-ex2 --rounds 2
# 3. Dense kernels on packs of one segment length.
check dense "${DENSE_S:-60}" --parts dense --rounds 2
# 4. fused_norm's bf16 gradients against fp32, in what is left of 540 s.
check grads $((540 - $(date +%s) + START)) --parts grads --fused-norm
date +%s >> "$R/t0"
kill $SMI
tail -n 3 "$R"/*.log
cat "$R/rc.txt"
