"""`qmerge demo`: the main job on an embedded default (pipeline.py: real fine-tunes of
all-MiniLM-L6-v2, a calibrated 1-bit pack, routed mixed batches, a static merge, an int8
export), and the ops on one real-sized weight (`qmerge demo --ops`, ops.py).

    data.py      text tasks from data that ships in packages (also the quality benchmark's)
    finetune.py  a quick classification fine-tune, cached on disk
    pipeline.py  the job, through the public verbs
    report.py    the printed report and the plot
    ops.py       the ops demo and `qmerge info`
"""
