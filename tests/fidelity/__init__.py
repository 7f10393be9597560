"""What "faithful to the papers" means here: one file per difference found against the official code (issue 16),
each comparing with the official definition (a count, a formula by hand, a schedule value).

SN-Net / SN-Netv2 (ziplab/SN-Net, ziplab/SN-Netv2)
   1 stitch space v2 ............... test_snnet_v2_space.py     6 pretrained heads ....... test_snnet_heads.py
   2 one stitch per DDP rank ....... test_snnet_per_rank.py     7 fulltune: false ........ test_snnet_fulltune.py
   3 distillation terms ............ test_snnet_kd.py           8 non-nearest stitching .. test_snnet_nearest.py
   4 least-squares init recipe ..... test_snnet_ls_init.py      9 ResNet / Swin anchors .. test_snnet_anchors.py
   5 costs in multiply-adds ........ test_snnet_macs.py
SubTuning (talswisa/SubTuning)
  10 greedy start "both" ........... test_subtuning_greedy_start.py
  11 candidate scoring recipe ...... test_subtuning_scoring.py
  12 profile on the module's device  test_subtuning_device.py
EMoE (qiuzh20/EMoE, tutel)
  13 k-means settings .............. test_emoe_kmeans.py        16 cosine router ......... test_emoe_cosine_router.py
  14 capacity, token dropping ...... test_emoe_capacity.py      17 layers per family ..... test_emoe_layer_defaults.py
  14 balance loss weight ........... test_emoe_balance_weight.py
  15 expert dropout, fp32 gate ..... test_emoe_expert_dropout.py, test_emoe_fp32_gate.py
Distillation, continual, pruning (megvii-research/mdistiller, aimagelab/mammoth, Zhu & Gupta, Frankle et al.)
  18 DKD warm-up ................... test_dkd_warmup.py         21 lottery LR rewinding .. test_lottery_rewind_lr.py
  19 replay without replacement .... test_replay_draws.py       22 DER / ER as Mammoth ... test_der_logits.py
  20 per-layer gradual pruning ..... test_gradual_per_layer.py
"""
