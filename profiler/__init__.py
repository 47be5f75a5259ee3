"""The profiler: measures the executor's blocks, memory and links on real devices (CPU or GPU)
and writes planner/profile.py's format. Entry: `meshplan profile` (cli/profile_cmd.py).

Modules: device (clocks, memory, backend, topology; every CUDA path), compute (block timing and
saved-tensor bytes), links (p2p schedule and collectives), workers (processes, torchrun),
settings (quick/full presets), run (orchestration and output), merge (node profiles; torch-free),
summary (tables and the bandwidth heat-map), progress (rich bars), stats (median, IQR).
"""
