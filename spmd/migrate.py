"""`python -m spmd.migrate`: move work between the ranks of a running job through its control socket.

    python -m spmd.migrate status
    python -m spmd.migrate move --kind 1 --from 0 --to 2 --heads 1            # one KV-head group, with its queries
    python -m spmd.migrate move --kind 2 --from 1 --to 0 --ffn-columns 704    # FFN columns, in whole 32-blocks
    python -m spmd.migrate move --kind 3 --from 0 --to 1 --heads 1 --ffn-blocks 22 --at 120
    python -m spmd.migrate layers --from-stage 0 --to-stage 1 --count 2      # boundary layers between stages
    python -m spmd.migrate ratios 1:1:2
    python -m spmd.migrate ratios "1:1@10*2:3"                                # any layout for the same ranks

The socket is found in the per-user folder when exactly one job is running there (or give --socket). A migration's
reply comes once it has been applied. Errors are one line on stderr and exit status 1.
"""
from . import needs  # noqa: F401 (first: one line, not a traceback, where this Python lacks the set-up)
import json
import math
import sys

import click

from .client import ClientError, find_socket, request
from .errors import click_main, nonempty
from .plan import FFN_BLOCK


def ranges_text(spans):
    return ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in spans if b > a) or "-"


def show_plan(ranks):
    timed = "compute_ms" in ranks[0]
    lines = [f"{'rank':>4}  {'stage':>5}  {'layers':<8} {'heads':>5}  {'kv groups':<10} {'ffn cols':>8}  "
             f"{'ffn blocks':<16} {'vocab rows':<14}" + ("  compute ms  sync ms" if timed else "")]
    for r in ranks:
        vocab = f"{r['vocab_range'][0]}-{r['vocab_range'][1] - 1}" if r["vocab_rows"] else "-"
        idle = r.get("stage") is None  # (ratio 0: in no stage, holding nothing)
        stage, layers = ("idle", "-") if idle else (r["stage"], ranges_text([r["layers"]]))
        line = (f"{r['rank']:>4}  {stage:>5}  {layers:<8} {r['heads']:>5}  "
                f"{ranges_text(r['kv_groups']):<10} {r['ffn_columns']:>8}  {ranges_text(r['ffn_blocks']):<16} "
                f"{vocab:<14}")
        if timed:
            line += f"  {r['compute_ms']:>10.2f}  {r['sync_ms']:>7.2f}"
        lines.append(line)
    return "\n".join(lines)


def show_stages(stages):
    return "\n".join(f"stage {s['stage']}: layer{'s' * (s['layers'][1] - s['layers'][0] > 1)} "
                     f"{ranges_text([s['layers']])} on rank{'s' * (len(s['ranks']) > 1)} "
                     f"{ranges_text([(s['ranks'][0], s['ranks'][-1] + 1)])}"
                     + (f", {s['compute_ms']:.2f} ms compute, {s['sync_ms']:.2f} ms sync per token"
                        if "compute_ms" in s else "") for s in stages)


def show(reply):
    if "position" in reply:  # status
        return (f"position {reply['position']}, plan epoch {reply['epoch']}, layout {reply['ratios']}\n"
                + show_stages(reply["stages"]) + "\n" + show_plan(reply["ranks"]))
    return (f"applied at position {reply['applied_at']}: plan epoch {reply['epoch']}, "
            f"{reply['bytes_moved'] / 1e6:.2f} MB moved in {reply['ms']:.1f} ms; layout now {reply['ratios']}\n"
            + show_stages(reply["stages"]) + "\n" + show_plan(reply["plan"]))


def run(ctx, req):
    opts = ctx.obj
    try:
        reply = request(find_socket(opts["socket"]), req, reply_wait_s(opts["timeout"], req))
    except ClientError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if not reply.get("ok"):
        said = reply.get("error")
        click.echo(f"error: {said}" if isinstance(said, str) else
                   f"error: the job refused the request without saying why: {json.dumps(reply)[:200]}", err=True)
        sys.exit(1)
    try:
        text = json.dumps(reply) if opts["json"] else show(reply)
    except (KeyError, TypeError, ValueError, IndexError):  # a reply of another shape than we know: as it came
        text = json.dumps(reply)
    click.echo(text)


STATUS_WAIT_S, MIGRATE_WAIT_S = 30.0, 600.0  # --timeout's defaults: the job answers `status` at its next token,
# applies a migration at its next token (the weights moved: seconds), or at the position `--at` names (no limit)


def reply_wait_s(timeout, req):
    """Seconds to wait for the job's reply (None: as long as it takes): --timeout where given (0: no limit), else
    by the request."""
    if timeout is not None:
        return timeout or None
    if req["cmd"] == "status":
        return STATUS_WAIT_S
    return None if req.get("mode") == "at" else MIGRATE_WAIT_S


def with_mode(req, at):
    return {**req, "mode": "at", "at": at} if at is not None else {**req, "mode": "next"}


def finite(_ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=param)
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--socket", "socket_path", default=None, metavar="PATH", callback=nonempty,
              help="The job's control socket (default: the one running job's in the per-user folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as it came (one JSON object).")
@click.option("--timeout", default=None, type=click.FloatRange(min=0), callback=finite,
              help=f"Seconds to wait for the reply (0: as long as it takes). Default: {STATUS_WAIT_S:.0f} for status, "
                   f"{MIGRATE_WAIT_S:.0f} for a migration at the next token, no limit for one --at a position.")
@click.pass_context
def cli(ctx, socket_path, as_json, timeout):
    """Move work between the ranks of a running `spmd.run` or `spmd.serve` job, while it generates."""
    ctx.obj = {"socket": socket_path, "json": as_json, "timeout": timeout}


def json_flag(f):
    def set_json(ctx, _param, value):
        if value:
            ctx.obj["json"] = True
    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=set_json,
                        help="Print the reply as it came.")(f)


@cli.command()
@json_flag
@click.pass_context
def status(ctx):
    """The plan per rank, its epoch, and each rank's compute and sync time per token lately."""
    run(ctx, {"cmd": "status"})


@cli.command()
@click.option("--kind", required=True, type=click.IntRange(1, 3),
              help="1: attention heads only, 2: FFN columns only, 3: both.")
@click.option("--from", "src", required=True, type=click.IntRange(min=0), help="The rank that gives work away.")
@click.option("--to", "dst", required=True, type=click.IntRange(min=0), help="The rank that takes it.")
@click.option("--heads", "--kv-groups", "kv_groups", type=click.IntRange(min=1),
              help="KV-head groups to move, each a KV head with the query heads that share it (kinds 1 and 3).")
@click.option("--ffn-blocks", type=click.IntRange(min=1), help=f"FFN blocks of {FFN_BLOCK} columns (kinds 2, 3).")
@click.option("--ffn-columns", type=click.IntRange(min=1),
              help=f"FFN columns instead of blocks: a multiple of {FFN_BLOCK}.")
@click.option("--at", type=click.IntRange(min=0), help="Apply at this token position (default: the next token).")
@json_flag
@click.pass_context
def move(ctx, kind, src, dst, kv_groups, ffn_blocks, ffn_columns, at):
    """Move heads and/or FFN columns from one rank to another."""
    if ffn_columns is not None:
        if ffn_blocks is not None:
            raise click.UsageError("give --ffn-blocks or --ffn-columns, not both")
        if ffn_columns % FFN_BLOCK:
            raise click.UsageError(f"--ffn-columns {ffn_columns}: FFN columns move in whole blocks of {FFN_BLOCK}")
        ffn_blocks = ffn_columns // FFN_BLOCK
    if kind in (1, 3) and kv_groups is None:
        raise click.UsageError(f"--kind {kind} needs --heads N")
    if kind in (2, 3) and ffn_blocks is None:
        raise click.UsageError(f"--kind {kind} needs --ffn-blocks N or --ffn-columns N")
    if kind == 1 and ffn_blocks is not None or kind == 2 and kv_groups is not None:
        raise click.UsageError(f"--kind {kind} moves only {'heads' if kind == 1 else 'FFN columns'}; "
                               "use --kind 3 for both")
    req = {"cmd": "migrate", "kind": kind, "from": src, "to": dst}
    if kv_groups is not None:
        req["kv_groups"] = kv_groups
    if ffn_blocks is not None:
        req["ffn_blocks"] = ffn_blocks
    run(ctx, with_mode(req, at))


@cli.command()
@click.option("--from-stage", "from_stage", required=True, type=click.IntRange(min=0),
              help="The stage that gives layers away.")
@click.option("--to-stage", "to_stage", required=True, type=click.IntRange(min=0),
              help="An adjacent stage that takes them.")
@click.option("--count", required=True, type=click.IntRange(min=1), help="How many boundary layers move.")
@click.option("--at", type=click.IntRange(min=0), help="Apply at this token position (default: the next token).")
@json_flag
@click.pass_context
def layers(ctx, from_stage, to_stage, count, at):
    """Move the COUNT layers at the boundary of two adjacent stages, with their KV cache."""
    run(ctx, with_mode({"cmd": "migrate", "kind": "layers", "from_stage": from_stage, "to_stage": to_stage,
                        "count": count}, at))


@cli.command()
@click.argument("ratios")
@click.option("--at", type=click.IntRange(min=0), help="Apply at this token position (default: the next token).")
@json_flag
@click.pass_context
def ratios(ctx, ratios, at):
    """A whole new layout for the same ranks, e.g. 1:1:2 or "1:1@10*2:3" (stages regroup as it says); each rank
    keeps what it can of its current share."""
    run(ctx, with_mode({"cmd": "migrate", "ratios": ratios}, at))


def main(argv=None):
    """A mistake on the command line is one line too (click's usage block would be three), exit 2."""
    click_main(cli, "python -m spmd.migrate", argv)


if __name__ == "__main__":
    main()
