"""The small scenario the simulator tests share: 34 models on 2 devices, 15 minutes, every policy set."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

SMALL = """
name: small
seed: 3
duration_s: 900
tick_s: 5
warm_tick_s: 30
start_warm: false
cluster: {nodes: 1, devices_per_node: 2, host_memory_gb: 100}
models:
  - {name: resnet, count: 20, profile: resnet50, slo_ms: 100, service: {kind: lognormal, sigma: 0.2}}
  - {name: bert, count: 10, profile: bert_base, slo_ms: 100, max_batch_size: 64}
  - {name: llama, count: 4, profile: llama1b_decode, work_per_request: 8, slo_ms: 1000}
workload:
  synthetic: {total_rate_per_s: 6, zipf_s: 1.1, burst_off_s: 300, timer_periods_s: [30, 120]}
policy_sets:
  - always_on
  - {name: classic_faas, options: {keepalive_s: 60}}
  - ray_serve
  - {name: ember, options: {keepalive_hot_s: 30, keepalive_warm_s: 600}}
"""
