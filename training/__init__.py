"""Training of the WSNet classifier (Hu et al. 2020): losses, augmentation, datasets, metrics.

Entry points: ``python -m training.train_classifier`` (one run, DDP under ``torchrun``) and
``python -m training.cross_validate`` (patient-level k-fold). Imports ``napari_wscovid``'s core,
never napari or Qt.
"""
