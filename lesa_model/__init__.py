"""The LESA science core (Huynh & Elhamifar, CVPR 2020): pure PyTorch/NumPy, no orchestration.

``config`` (run-config sections), ``model`` (LESA), ``losses`` (Eq. 5-12), ``metrics``
(release-exact mAP and P/R/F1@K), ``data`` (batch sources), ``trainer`` (training with exact
resume), ``checkpoint`` (atomic, self-describing files), ``inference`` (scores, top-K, attention)
and ``attention`` (heatmaps and the pointing game).
"""
