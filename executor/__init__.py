"""The bundled executor: trains a GPT/Llama model with exactly a plan's TP x PP x DP layout.

Owns: the model (model.py), the device mesh (mesh.py), tensor/pipeline/data parallelism
(tp.py, pp.py, dp.py), activation checkpointing, data, checkpoints, metrics and the training
loop (train.py). Does not own: planning (planner/) or measuring (profiler/).
Importing this package imports torch; planner/ must never import it.
"""
