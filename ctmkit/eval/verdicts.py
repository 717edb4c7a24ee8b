"""The demo report's sentences: pure functions of the summary dict (summary.json, after a JSON round trip) that say
what each table measures, what good looks like, and what this run's numbers show, or do not show. Nothing here is
fixed text about the results: change the numbers and the sentences change with them."""

from __future__ import annotations

TIE = 0.10          # quality values within 10% of each other count as equal (seed-to-seed noise of the metric)
CLOSE = 5.0         # a gamma-0 coupled error within 5x the teacher-grid floor follows the teacher's ODE
WINDOW = 5          # log periods either side of ctm.gan_start averaged for the loss change


def num(v: float) -> str:
    """A value for a sentence: 2695.5 -> '2696', 14.87 -> '14.9', 1.278 -> '1.28', 1.0 -> '1.0', 0.02164 -> '0.0216'."""
    if abs(v) >= 10:
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    return f"{v:.1f}" if v == round(v) else f"{v:.3g}"


def nfe_list(ks: list[int]) -> str:
    """[2, 4, 8] -> '2, 4 and 8'."""
    ks = [str(k) for k in ks]
    return ks[0] if len(ks) == 1 else f"{', '.join(ks[:-1])} and {ks[-1]}"


def pct(a: float, b: float) -> str:
    """How far a is from b: '22%', or as a factor from 2x on ('3.8x')."""
    r = max(a, b) / min(a, b)
    return f"{r:.1f}x" if r >= 2 else f"{abs(a / b - 1) * 100:.0f}%"


def series(summary: dict, model: str, sampler: str, gamma: float = 0.0) -> list[dict]:
    """The quality rows of one series (custom-time rows left out)."""
    return [r for r in summary["rows"]
            if (r["model"], r["sampler"], float(r["gamma"])) == (model, sampler, gamma) and "ts" not in r]


def points(summary: dict, model: str, sampler: str, gamma: float = 0.0) -> dict[int, float]:
    """{nfe: value} of the quality rows of one series (custom-time rows left out)."""
    return {int(r["nfe"]): float(r["value"]) for r in series(summary, model, sampler, gamma)}


def floor_of(summary: dict) -> tuple[str, float]:
    """(what the floor is, its value) of the quality metric: two true samples (sliced W1 ratio 1.0), or two halves
    of the data (Frechet distances)."""
    if summary["metric"] == "swd_ratio":
        return "the true-vs-true floor", 1.0
    return "the data-vs-data floor", float(summary["data_vs_data"])


def metric_name(summary: dict) -> str:
    return "sliced W1 ratio" if summary["metric"] == "swd_ratio" else "Frechet distance"


def headline(summary: dict) -> str:
    """CTM NFE 1 and the teacher's Heun 35 side by side, each against the metric's floor (not a ratio of ratios)."""
    ctm1 = points(summary, "ctm", "gamma").get(1)
    heun35 = points(summary, "teacher", "heun").get(35)
    if ctm1 is None or heun35 is None:
        return ""
    name, floor = floor_of(summary)
    if summary["metric"] == "swd_ratio":
        return (f"CTM NFE 1 (gamma 0): {num(ctm1)}x the true-vs-true floor; teacher Heun 35 NFE: {num(heun35)}x "
                "(1.0 = as close to the data as a second true sample)")
    return (f"CTM NFE 1 (gamma 0): {num(ctm1)}; teacher Heun 35 NFE: {num(heun35)}; {name}: {num(floor)} "
            f"({metric_name(summary)}; lower is better)")


def one_step_clause(ctm1: float, heun: dict[int, float]) -> str:
    """How one CTM step compares with each of the teacher's Heun budgets."""
    level = [k for k in sorted(heun) if ctm1 <= heun[k] * (1 + TIE)]
    short = [k for k in sorted(heun) if k not in level]
    best = min(heun, key=heun.get)
    if not short:
        return (f"one CTM step ({num(ctm1)}) is as close to the data as the teacher's Heun at every budget, up to "
                f"{max(heun)} NFE ({num(heun[max(heun)])})")
    if not level:
        return (f"one CTM step ({num(ctm1)}) is further from the data than the teacher's Heun at every budget (best: "
                f"{num(heun[best])} at {best} NFE): the student has not caught up with its teacher")
    return (f"one CTM step ({num(ctm1)}) matches or beats the teacher's Heun at {nfe_list(level)} NFE, not at "
            f"{nfe_list(short)} NFE (the teacher's best, {num(heun[best])} at {best} NFE; one step is "
            f"{pct(ctm1, heun[best])} further)")


def seed_spreads(summary: dict, model: str, sampler: str, gamma: float = 0.0) -> dict[int, float]:
    """{nfe: max - min of the per-sampling-seed values} of one series, where the metric records them (the sliced W1
    ratio's `seed_ratios`); empty otherwise."""
    return {int(r["nfe"]): max(r["seed_ratios"]) - min(r["seed_ratios"]) for r in series(summary, model, sampler, gamma)
            if len(r.get("seed_ratios", ())) > 1}


def more_steps_clause(g0: dict[int, float], spread: dict[int, float] | None = None) -> str:
    """Whether this run shows CTM's claim that more (gamma-0) steps do not degrade the samples. NFE k counts as worse
    than NFE 1 when it is higher by more than the larger of the two points' spreads over the sampling seeds
    (`spread`, {nfe: max - min}), else (no spreads) by more than TIE."""
    one, more = g0[1], sorted(k for k in g0 if k > 1)
    values = ", ".join(num(g0[k]) for k in more)
    by_seeds = bool(spread) and all(k in spread for k in [1, *more])
    margin = {k: max(spread[1], spread[k]) if by_seeds else one * TIE for k in more}
    worse = [k for k in more if g0[k] - one > margin[k]]
    why = ("the larger of the two points' ranges over the sampling seeds" if by_seeds
           else f"{TIE:.0%} of NFE 1's value")
    if worse:
        each = "; ".join(f"NFE {k}: {pct(g0[k], one)} worse, {num(g0[k] - one)} above NFE 1 against "
                         f"{num(margin[k])}" for k in worse)
        return (f"this run does not show CTM's claim that more steps do not degrade: gamma 0 at NFE {nfe_list(more)} "
                f"gives {values} against {num(one)} at NFE 1, higher by more than {why} at NFE {nfe_list(worse)} "
                f"({each})")
    text = (f"this run shows CTM's claim that more steps do not degrade: gamma 0 at NFE {nfe_list(more)} gives "
            f"{values}, none above {num(one)} at NFE 1 by more than {why}")
    last = g0[more[-1]]
    if last * (1 + TIE) < one:
        text += f", and more steps help ({pct(last, one)} better at NFE {more[-1]})"
    return text


def gamma_clause(g0: dict[int, float], g1: dict[int, float]) -> str:
    """Gamma 1 (fresh noise at every step) against gamma 0 at the largest NFE both were sampled at."""
    k = max(set(g0) & set(g1))
    a, b = g1[k], g0[k]
    how = ("as good as" if abs(a / b - 1) <= TIE else f"{pct(a, b)} {'better' if a < b else 'worse'} than")
    return f"at NFE {k}, gamma 1 (fresh noise at every step) gives {num(a)}, {how} gamma 0's {num(b)}"


def quality_verdict(summary: dict) -> str:
    """The quality table's verdict: what good looks like, one step against the teacher, more steps, gamma."""
    name, floor = floor_of(summary)
    g0, g1 = points(summary, "ctm", "gamma", 0.0), points(summary, "ctm", "gamma", 1.0)
    heun = points(summary, "teacher", "heun")
    good = f"Good is close to {name} ({num(floor)})"
    if 35 in heun:
        good += f" and to the teacher's Heun at 35 NFE ({num(heun[35])}), the ODE solve the CTM learns to shortcut"
    spread = seed_spreads(summary, "ctm", "gamma", 0.0)
    by_seeds = "; more steps against one are judged by the spread over the sampling seeds" if spread else ""
    parts = [good + f"; values within {TIE:.0%} of each other count as equal here{by_seeds}."]
    clauses = []
    if 1 in g0 and heun:
        clauses.append(one_step_clause(g0[1], heun))
    if 1 in g0 and len(g0) > 1:
        clauses.append(more_steps_clause(g0, spread))
    if g0 and g1 and set(g0) & set(g1):
        clauses.append(gamma_clause(g0, g1))
    if clauses:
        text = "; ".join(clauses) + "."
        parts.append(text[0].upper() + text[1:])
    return " ".join(parts)


def coupled(d: dict, gamma: int) -> dict[int, float]:
    """{nfe: coupled error} of one gamma from the summary's diagnosis (JSON keys are strings)."""
    return {int(k): float(v) for k, v in d[f"coupled_gamma{gamma}"].items()}


def coupled_verdict(summary: dict) -> str:
    """The coupled-error table's verdict: gamma 0 against the floor; gamma 1 against gamma 0, and why a large
    coupled error can sit beside a good quality value (the two measure different things)."""
    d = summary["diagnosis"]
    floor, c0, c1 = float(d["teacher_grid_floor"]), coupled(d, 0), coupled(d, 1)
    parts = [f"Measured: how far each CTM sample lands from the teacher's accurate ODE solution from the same noise; "
             f"good is near the floor, the teacher's own Heun solve on the {d['grid_points']}-point grid "
             f"({num(floor)})."]
    parts.append(gamma0_sentence(c0, floor))
    multi = [k for k in c1 if k > 1 and k in c0]
    if multi:
        parts.append(gamma1_sentence(summary, c0, c1, multi))
    return " ".join(parts)


def gamma0_sentence(c0: dict[int, float], floor: float) -> str:
    """Whether the deterministic (gamma 0) samples follow the teacher's ODE: within CLOSE x the floor, per NFE."""
    times = {k: v / max(floor, 1e-12) for k, v in c0.items()}
    close = [k for k in sorted(times) if times[k] <= CLOSE]
    far = [k for k in sorted(times) if k not in close]
    shown = ", ".join(f"{times[k]:.1f}x at NFE {k}" for k in far)
    if len(far) > 3:
        lo, hi = min(far, key=times.get), max(far, key=times.get)
        shown = f"from {times[lo]:.1f}x at NFE {lo} to {times[hi]:.1f}x at NFE {hi}"
    if not far:
        worst = max(times, key=times.get)
        return (f"Gamma 0 (deterministic jumps) stays within {CLOSE:g}x the floor at every NFE (at most "
                f"{times[worst]:.1f}x, at NFE {worst}): it follows the teacher's ODE.")
    if not close:
        return (f"Gamma 0 (deterministic jumps) is more than {CLOSE:g}x the floor at every NFE ({shown}): it has not "
                "learned the teacher's ODE closely.")
    return (f"Gamma 0 (deterministic jumps) follows the teacher's ODE within {CLOSE:g}x the floor at NFE "
            f"{nfe_list(close)}, not at NFE {nfe_list(far)} ({shown}).")


def gamma1_sentence(summary: dict, c0: dict[int, float], c1: dict[int, float], multi: list[int]) -> str:
    """Gamma 1's coupled error against gamma 0's, read beside the quality table."""
    factor = sum(c1[k] / c0[k] for k in multi) / len(multi)
    g0, g1 = points(summary, "ctm", "gamma", 0.0), points(summary, "ctm", "gamma", 1.0)
    if factor <= 2:
        return f"Gamma 1 stays near gamma 0 ({factor:.1f}x its error on average at NFE {min(multi)} to {max(multi)})."
    text = (f"Gamma 1 is {factor:.0f}x gamma 0's error on average at NFE {min(multi)} to {max(multi)}, by design: it "
            "re-noises after every jump, so its samples leave the teacher's trajectory from z")
    both = sorted(set(g0) & set(g1) - {1})
    if not both:
        return text + "."
    k = max(both)
    metric = metric_name(summary)
    if g1[k] <= g0[k] * (1 + TIE):
        best = min(min(g0.values()), min(g1.values()))
        rank = "the best CTM value" if g1[k] == best else f"against gamma 0's {num(g0[k])}"
        return (text + f"; yet its {metric} at NFE {k} is {num(g1[k])} ({rank}): the coupled error measures how "
                "closely samples follow the teacher's ODE, the quality table how close their distribution is to the "
                "data.")
    return text + f", and its {metric} at NFE {k} is also worse ({num(g1[k])} against gamma 0's {num(g0[k])})."


def what_ran(summary: dict) -> str:
    """The training that actually ran: steps, loss terms, and whether the GAN term ever started."""
    r = summary["ran"]
    terms = "CTM + DSM" if r["dsm"] else "CTM"
    if r["gan"] and r["gan_start"] < r["distill_steps"]:
        terms += f" + GAN from step {r['gan_start']}" if r["gan_start"] > 0 else " + GAN"
    elif r["gan"]:
        terms += (f"; the GAN term never ran: ctm.gan_start={r['gan_start']} is not below "
                  f"train.steps={r['distill_steps']}")
    init = ", initialised from the teacher" if r["init_from_teacher"] else ""
    text = f"Teacher: EDM, {r['teacher_steps']} steps. CTM: {r['distill_steps']} steps ({terms}){init}."
    if "ema" in r:      # the training recipe: pair draw, learning-rate schedule, the weights sampled
        kept = (f"; post-hoc EMA snapshots of widths {', '.join(f'{w:g}' for w in r['phema'])} kept for "
                "`ctmkit ema`" if r["phema"] else "")
        width = r.get("sample_sigma_rel", 0.0)      # from the CTM's model card: what it samples
        sampled = (f"the post-hoc EMA of width sigma_rel {width:g} (ctm.sample_sigma_rel), rebuilt at the last step"
                   if width else f"the training EMA (rate {r['ema']:g})")
        text += f" Pairs: {r['pairs']}; learning rate {r['lr']:g}, {r['lr_schedule']}; sampled: {sampled}{kept}."
    return text


def mean_of(values) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def period_means(rows: list[dict]) -> dict:
    """Mean loss terms over some stats.jsonl rows; a weighted term is averaged as the per-period product of the
    period means (lambda * L)."""
    def product(r, lam, loss):
        return r[lam] * r[loss] if lam in r and loss in r else None

    return {"steps": [rows[0]["step"], rows[-1]["step"]], "loss": mean_of(r.get("loss") for r in rows),
            "loss_ctm": mean_of(r.get("loss_ctm") for r in rows),
            "lambda_dsm": mean_of(r.get("lambda_dsm") for r in rows),
            "dsm_term": mean_of(product(r, "lambda_dsm", "loss_dsm") for r in rows),
            "gan_term": mean_of(product(r, "lambda_gan", "loss_gan_g") for r in rows)}


def loss_change(rows: list[dict], gan_start: int, window: int = WINDOW) -> dict | None:
    """The CTM's loss terms over the `window` log periods before ctm.gan_start and the `window` after (stats.jsonl
    rows); None when the log has no period on one side."""
    before = [r for r in rows if r["step"] <= gan_start][-window:]
    after = [r for r in rows if r["step"] > gan_start][:window]
    if not before or not after:
        return None
    return {"gan_start": gan_start, "before": period_means(before), "after": period_means(after)}


def loss_note(summary: dict) -> str:
    """Why the CTM's total loss moves at ctm.gan_start, from the logged terms; '' when the GAN did not start
    part-way through (no jump to explain)."""
    ch = summary.get("distill_loss")
    if not ch or ch["before"]["loss"] is None or ch["after"]["loss"] is None:
        return ""
    b, a = ch["before"], ch["after"]
    moves = "rises" if a["loss"] > b["loss"] else "falls"
    parts = [f"At step {ch['gan_start']} (ctm.gan_start) the GAN generator term joins the CTM's loss, and the total "
             f"`loss` in loss_ctm.png {moves} from {num(b['loss'])} to {num(a['loss'])} (means of the log periods "
             f"ending at steps {b['steps'][0]}-{b['steps'][1]} and {a['steps'][0]}-{a['steps'][1]})"]
    terms = []
    if a["gan_term"] is not None:
        terms.append(f"lambda_GAN * L_GAN adds {num(a['gan_term'])}")
    if a["loss_ctm"] is not None and b["loss_ctm"] is not None:
        terms.append(f"L_CTM goes from {num(b['loss_ctm'])} to {num(a['loss_ctm'])}")
    if a["dsm_term"] is not None and b["dsm_term"] is not None:
        terms.append(f"lambda_DSM * L_DSM from {num(b['dsm_term'])} to {num(a['dsm_term'])} (the adaptive lambda_DSM, "
                     f"|grad L_CTM| / |grad L_DSM| at the last layer, from {num(b['lambda_dsm'])} to "
                     f"{num(a['lambda_dsm'])})")
    if terms:
        parts.append("of its terms, " + "; ".join(terms))
    return ": ".join(parts) + ". The total sums differently weighted terms, so its level before and after the GAN " \
        "term starts is not comparable."


def time_line(summary: dict) -> str:
    """The time of every stage, and the total."""
    t = summary["times"]
    names = (("teacher_s", "teacher"), ("distill_s", "CTM"), ("eval_s", "evaluation"), ("diagnose_s", "diagnosis"))
    parts = [f"{label} {t[key]:.0f} s" for key, label in names if key in t]
    total = sum(t[key] for key, _ in names if key in t)
    line = f"Time: {', '.join(parts)}; {total:.0f} s in all"
    if t.get("sessions", 1) > 1:
        line += f", over {t['sessions']} sessions (interrupted and resumed)"
    return line + "."
