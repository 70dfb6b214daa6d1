"""Low-resolution image classification with knowledge distillation.

The package holds everything the top-level scripts share:

- ``data``:     the DACON table, the shared stratified split, the decode-once image
                cache, batches and paired HR/LR views;
- ``models``:   torchvision classifiers by name, weights, checkpoints, the frozen teacher;
- ``distill``:  training objectives; each returns a dict of named loss terms;
- ``trainer``:  ``fit`` (AdamW, ReduceLROnPlateau, early stopping, resume) and ``evaluate``;
- ``metrics``:  accuracy and macro-F1;
- ``plots``:    learning curves and the test comparison;
- ``stages``:   the bodies of the train/test scripts;
- ``cli``:      one-line errors, atomic writes, run folders and run records;
- ``demo``:     the built-in synthetic dataset.
"""
