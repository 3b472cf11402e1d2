"""`meshplan models` and `meshplan clusters`: list the presets."""

from __future__ import annotations

import click

from .specfiles import _cluster_presets_raw, load_model, model_presets


@click.command("models")
def models() -> None:
    """List model presets (usable as --model NAME)."""
    names = model_presets()
    width = max(16, *(len(name) for name in names))  # the name column fits the longest
    click.echo(f"{'name':<{width}} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} "
               f"{'vocab':>7}  kind")
    for name in names:
        m = load_model(name)
        kind = f"MoE {m.num_experts}x top-{m.experts_top_k}" if m.is_moe else m.mlp_kind
        if m.layer_pattern:
            kind += f", hybrid: {m.mamba_layers} Mamba + {m.attention_layers} attention layers"
        click.echo(f"{name:<{width}} {m.num_layers:>6} {m.hidden_size:>6} {m.num_heads:>5} "
                   f"{m.num_kv_heads:>3} {m.vocab_size:>7}  {kind}")


@click.command("clusters")
def clusters() -> None:
    """List cluster presets (usable as --cluster NAME --nodes N)."""
    for name, raw in sorted(_cluster_presets_raw().items()):
        per_domain = raw.get("nodes_per_domain", 1)
        domain = (f", NVLink domain of {per_domain} nodes ({per_domain * raw['gpus_per_node']} "
                  "GPUs)" if per_domain > 1 else "")
        across = "domains" if per_domain > 1 else "nodes"
        click.echo(f"{name:<14} {raw['gpus_per_node']} x {raw['gpu']} per node, "
                   f"{raw['intra_node']['kind']} {raw['intra_node']['bandwidth_GBps']} GB/s inside"
                   f"{domain}, {raw['inter_node']['kind']} {raw['inter_node']['bandwidth_GBps']} "
                   f"GB/s per GPU across {across}")
