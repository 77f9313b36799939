"""The token probe's Markdown report (``benchmarks/token_probe.py``): every mode's NLL, every paired difference, the
issue's goal for each kind of token, and the group tokens' part as training went on, rendered from the JSON alone
so that a stored result renders again without a rerun.
"""

from __future__ import annotations

from recbole_uip.benchmarking import goal_verdict, settings_fingerprint, settings_table
from recbole_uip.token_probe.modes import keep_mode, objective_pairs, reading_order
from recbole_uip.token_probe.stages import still_learning


def describe_objective(objective: str, data: dict) -> str:
    """What tokens fitted on ``objective`` were fitted to, for the report: "plain NLL of a random 64 tokens of ..."
    (of the newest 64 tokens where the settings say ``uip_target: newest``)."""
    settings = data["record"]["settings"]
    draws, per_step = data.get("draws", 1), data.get("fit_texts_per_step", 1)
    if settings.get("target") == "newest":                  # uip_target: newest draws the same text every time
        draw = (f"the newest {settings['max_behaviour_tokens']} tokens of their remaining training text "
                "(`uip_target: newest`)")
    else:
        draw = (("a new random draw at every step of " if data.get("resample") else
                 f"{draws} random draws, one per step in turn, each of " if draws > 1 and per_step == 1 else
                 f"{draws} random draws, {per_step} per step in turn (each step on their mean gradient), each of "
                 if draws > 1 else "a random ")
                + f"{settings['max_behaviour_tokens']} tokens of their remaining training text")
    source = data.get("teacher_context", "history")
    context = (("each fit's start prompt, then " if data.get("teacher_prompt") == "start" else "")
               + (f"the user's newest {data.get('distil_context_tokens')} tokens of their other remaining items"
                  if source == "history" else
                  f"the last {data.get('distil_context_tokens')} tokens of a text of items a Mult-VAE predicts for "
                  f"the user among those they have not seen, "
                  + ("most probable first" if source == "mult_vae_top" else "drawn from its distribution")))
    alone = data.get("teacher_alone_weight", 0)
    mixed = (f"; its predictions mixed, weight {alone:g}, with the LLM's without the context, after "
             + ("the start prompt" if data.get("teacher_prompt") == "start" else "the shared token") + " alone"
             + ("; the context read after the shared token, without the start prompt"
                if data.get("teacher_context_prompt") == "shared" else "")
             if alone else "")
    return {"weighted": f"M-step's objective (rating tokens weigh {settings['rating_weight']:g}) of {draw}",
            "distil": f"frozen LLM's predictions (distillation; the teacher reads {context} before the text{mixed}) "
                      f"for {draw}",
            "teacher_text": f"plain NLL of the teacher's whole text ({context}, then {draw}; no teacher)",
            "mult_vae": (("plain NLL of a new text at every step" if per_step == 1 else
                          f"mean plain NLL of {per_step} new texts at every step") + ", "
                         f"{settings['max_behaviour_tokens']} tokens of items "
                         "drawn from a Mult-VAE's distribution over the items the user has not seen, given their "
                         "remaining training items (`recbole_uip.collaborative_text`)"),
            }.get(objective, f"plain NLL of {draw}")


def against_the_code(part_difference: dict) -> str:
    """The verdict on a choice of group by likelihood from its part minus the nearest code's group's part
    (``{"mean", "ci"}``): below zero over the whole interval, the likelihood places users better; above, the
    untrained code does; else neither."""
    low, high = part_difference["ci"]
    return ("the likelihood places users better than the untrained code" if high < 0 else
            "the untrained code places them better" if low > 0 else "no better than the code")


def difference_row(label: str, summary: dict) -> str:
    """A paired difference's table row: ``| label | mean | [low, high] | share of users below 0 |`` (``summary``:
    ``benchmarking.difference_summary``'s ``{"mean", "ci", "share_below_zero"}``)."""
    return (f"| {label} | {summary['mean']:+.4f} | [{summary['ci'][0]:+.4f}, {summary['ci'][1]:+.4f}] | "
            f"{summary['share_below_zero']:.0%} |")


def render(data: dict) -> str:
    modes, differences = data["modes"], data["differences"]
    labels = {"own_minus_mean": "own - mean (held-out text: what generalises)",
              "own_minus_other_user": "own - another user's (held-out text)",
              "own_halfway_minus_mean": "own shrunk halfway to the mean - mean (held-out text)",
              "mean_minus_shared": "mean of the fitted tokens - the shared token before fitting (held-out text)",
              "oracle_minus_mean": "fitted on the held-out text itself - mean (the most one token can do)",
              "own_on_fitted_text_minus_mean_on_fitted_text": "own - mean on the text they were fitted to (memorisation)",
              "own_on_new_draw_minus_mean_on_new_draw":
                  "own - mean on a new text from the distribution they were fitted to (fitted on by nothing)",
              "own_on_new_draw_minus_other_user_on_new_draw":
                  "own - another user's on a new text from the user's distribution (fitted on by nothing)",
              "encoder_on_new_draw_minus_encoder_mean_on_new_draw":
                  "encoder's A z - its mean on a new text from the distribution it was trained on",
              "encoder_on_new_draw_minus_encoder_other_on_new_draw":
                  "encoder's A z - another user's on a new text from the user's distribution",
              "mean_minus_shared_prefix": "mean of the fitted deep prompts - the deep prompt before fitting (held-out text)",
              "shared_prefix_minus_shared": "the deep prompt before fitting - the shared token alone (held-out text)",
              "rating_mean_minus_rating_shared_prefix":
                  "mean of the fitted deep prompts - the deep prompt before fitting (held-out rating tokens)",
              "rating_shared_prefix_minus_rating_shared":
                  "the deep prompt before fitting - the shared token alone (held-out rating tokens)",
              "rating_own_minus_rating_mean": "own - mean (held-out rating tokens)",
              "rating_own_minus_rating_other_user": "own - another user's (held-out rating tokens)",
              "rating_own_halfway_minus_rating_mean": "own shrunk halfway to the mean - mean (held-out rating tokens)",
              "rating_mean_minus_rating_shared": "mean of the fitted tokens - the shared token (held-out rating tokens)",
              "rating_oracle_minus_rating_mean": "fitted on the held-out text itself - mean (its rating tokens)",
              "encoder_minus_encoder_mean": "encoder's A z - its mean over the batch (held-out text)",
              "encoder_minus_encoder_other": "encoder's A z - another user's (held-out text)",
              "encoder_mean_minus_shared": "encoder's mean - the shared token (held-out text)",
              "own_minus_encoder": "own - the encoder's prompt they started from (held-out text: what the fit adds)",
              "mean_minus_encoder": "mean - the encoder's prompt (held-out text)",
              "rating_own_minus_rating_encoder": "own - the encoder's prompt they started from (held-out rating tokens)",
              "rating_mean_minus_rating_encoder": "mean - the encoder's prompt (held-out rating tokens)",
              "rating_encoder_minus_rating_encoder_mean": "encoder's A z - its mean (held-out rating tokens)",
              "rating_encoder_minus_rating_encoder_other": "encoder's A z - another user's (held-out rating tokens)",
              "rating_encoder_mean_minus_rating_shared": "encoder's mean - the shared token (held-out rating tokens)"}
    for prefix, what in (("", "held-out text"), ("rating_", "held-out rating tokens")):
        labels.update({f"{prefix}teacher_minus_{prefix}teacher_other":
                           f"the distillation teacher with the user's context - with another user's ({what})",
                       f"{prefix}teacher_minus_{prefix}shared": f"the distillation teacher - the shared token ({what})",
                       f"{prefix}teacher_minus_{prefix}encoder":
                           f"the distillation teacher - the encoder's prompt, no context (with --teacher_prompt=start "
                           f"the prompt the teacher reads; {what})",
                       f"{prefix}own_minus_{prefix}teacher": f"own - the distillation teacher ({what})"})
    pooled = data.get("group_choice_draws", 1)
    for prefix, what in (("", "held-out text"), ("rating_", "held-out rating tokens")):
        labels.update({f"{prefix}group_own_minus_{prefix}group_mean": f"own group's token - their mean ({what})",
                       f"{prefix}group_own_minus_{prefix}group_any":
                           f"own group's token - the user's mean over every group's token ({what})",
                       f"{prefix}group_own_minus_{prefix}group_other": f"own group's token - the next group's ({what})",
                       f"{prefix}group_mean_minus_{prefix}shared":
                           f"mean of the group tokens - the shared token ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_own":
                           f"the likeliest group's token - the nearest code's group's ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_mean":
                           f"the likeliest group's token - the mean of the group tokens ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_likeliest_other":
                           f"the likeliest group's token - another user's likeliest ({what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_best":
                           f"the likeliest group's token - the one best for everyone ({what})",
                       f"{prefix}group_best_minus_{prefix}shared":
                           f"the group token best for everyone - the shared token ({what})",
                       f"{prefix}group_own_minus_{prefix}group_own_additive":
                           f"own group's token - what it scores on a user of any group (the group's part, {what})",
                       f"{prefix}group_likeliest_minus_{prefix}group_likeliest_additive":
                           f"the likeliest group's token - what it scores on any user (the choice's part, {what})",
                       f"{prefix}group_relative_minus_{prefix}group_own":
                           f"the relatively likeliest group's token - the nearest code's group's ({what})",
                       f"{prefix}group_relative_minus_{prefix}group_relative_additive":
                           f"the relatively likeliest group's token - what it scores on any user (its part, {what})",
                       f"{prefix}group_relative_part_minus_{prefix}group_own_part":
                           f"the relatively likeliest group's part - the nearest code's group's part ({what})",
                       f"{prefix}group_relative_pooled_minus_{prefix}group_own":
                           f"the relatively likeliest group over {pooled} draws' token - the nearest code's group's "
                           f"({what})",
                       f"{prefix}group_relative_pooled_minus_{prefix}group_relative_pooled_additive":
                           f"the relatively likeliest group over {pooled} draws' token - what it scores on any user "
                           f"(its part, {what})",
                       f"{prefix}group_relative_pooled_part_minus_{prefix}group_own_part":
                           f"the relatively likeliest group over {pooled} draws' part - the nearest code's group's "
                           f"part ({what})",
                       f"{prefix}group_relative_pooled_part_minus_{prefix}group_relative_part":
                           f"the relatively likeliest group over {pooled} draws' part - over the first draw alone "
                           f"({what})",
                       f"{prefix}count_group_own_minus_{prefix}count_population":
                           f"no LLM: own group's count model - the population's ({what})",
                       f"{prefix}count_group_own_minus_{prefix}count_group_other":
                           f"no LLM: own group's count model - the next group's ({what})",
                       f"{prefix}count_group_own_minus_{prefix}count_group_own_additive":
                           f"no LLM: own group's count model - its additive twin (the group's part, {what})",
                       f"{prefix}count_set_minus_{prefix}count_population":
                           f"no LLM: a count model of the user's own history as a set - the population's ({what})"})
    for n in data.get("context_tokens", []):
        for prefix, what in (("", "held-out text"), ("rating_", "held-out rating tokens")):
            labels[f"{prefix}context{n}_own_minus_{prefix}shared"] = (
                f"shared token + own history in context (N={n}) - the shared token alone ({what})")
            labels[f"{prefix}context{n}_own_minus_{prefix}context{n}_other"] = (
                f"own history - another user's, both in context beside the shared token (N={n}, {what})")
    for objective in data.get("also_fit", []):
        for a, b in objective_pairs([objective]):
            plain_a, plain_b = (x.replace(objective + "_", "") for x in (a, b))
            labels[f"{a}_minus_{b}"] = (f"own ({data['fit_objective']}) - own fitted on {objective}" + (
                " (held-out rating tokens)" if a.startswith("rating_") else " (held-out text)")
                if plain_a == plain_b else f"{objective}: {labels.get(f'{plain_a}_minus_{plain_b}', f'{a} - {b}')}")
    settings = data["record"]["settings"]
    deep = data.get("fit_prefix") == "deep"
    from_encoder = data.get("fit_start") == "encoder"
    fit_start = ("what the encoder stage above wrote for the user" if from_encoder
                 else "the keys the shared tokens have at each layer and zero values")
    fitted = (f" Then {data['users']} other users' "
              + ("deep prompts (keys and values at every layer of the LLM, one entry per profile, read before the "
                 f"prompt; starting with {fit_start}, the soft "
                 "tokens kept at the shared token; every `own`, `mean`, `other_user` and `oracle` below is a deep "
                 "prompt)" if deep else "tokens (starting from the encoder's `A z`)" if from_encoder else "tokens")
              + f" each fitted alone with {data['fit_steps']} Adam steps (step {data['fit_learning_rate']:g} of "
              + ("each layer's root mean square key and value of the shared tokens" if deep
                 else "the mean token-embedding norm")
              + ") on the "
              + describe_objective(data["fit_objective"], data) + "."
              + "".join(f" The same users' tokens also fitted from the same start, draws and steps on the "
                        f"{describe_objective(objective, data)} (`{objective}_*`)." for objective in data.get("also_fit", []))
              ) if data["fit_steps"] else ""
    teacher = (f"distillation; the teacher reads the user's newest {data.get('distil_context_tokens')} tokens of their "
               f"other remaining items before the text")
    def trained_on(objective: str, losses: list[float]) -> str:
        """What a stage (the shift, the encoder) trained on and its loss per pass, for the report."""
        per_pass = ", ".join(f"{v:.4f}" for v in losses)
        drop = still_learning(losses)
        # A shift stopped while still learning leaves part of what every user's text needs to the per-user fits,
        # each learning it alone in its few steps (seen with the genre-only text, results/ml-100k/5068856ecb02/);
        # an encoder stopped so is scored before it has learnt what it can.
        per_pass += (f"; **still falling**: the last pass lowered it by {drop:.4f} ({drop / abs(losses[-1]):.1%}), "
                     f"so more passes would still change it" if drop is not None else "")
        if objective == "mult_vae":
            return (f", on texts drawn from a Mult-VAE's prediction of each user's unseen items, a new one at every "
                    f"batch (NLL per pass {per_pass})")
        return (f", on the frozen LLM's predictions ({teacher}; cross-entropy per pass {per_pass})"
                if objective == "distil" else f" (NLL per pass {per_pass})")

    deep_start = "keys and values at every layer of the LLM, one entry per profile, from the shared tokens' keys and zero values"
    trained, beside = {     # what the encoder stage trains, and what trains beside it
        "deep_shared": ("one deep prompt for every user (`start + scale S`: " + deep_start + "; the deep encoder's "
                        "`S` trained alone, its `W` held at zero: the control for the users' deep prompts; the soft "
                        "tokens kept at the shared token; every `encoder*` below is that prompt)",
                        " (the shift left as it was)"),
        "deep": ("a linear encoder from `z` to a deep prompt (`start + scale (S + W z)`: " + deep_start + "; `S` "
                 "shared by every user, the soft tokens kept at the shared token; every `encoder*` below is a deep "
                 "prompt)", ", `S` beside it (the shift left as it was)"),
    }.get(data.get("encoder_prefix"), ("the linear encoder", ", the shift beside it"))
    step_unit = ("" if data.get("encoder_prefix", "shallow") == "shallow"
                 else " of each layer's root mean square key and value of the shared tokens")
    encoder = (f" Then {trained} trained by Adam at every batch (step {data['encoder_learning_rate']:g}{step_unit}) "
               f"for {data['encoder_passes']} passes over the same {data['shift_users']} users{beside}"
               + trained_on(data.get("encoder_objective"), data["encoder_nll"])
               + f"; {data['users']} other users scored with `A z` from their remaining items"
               + (" (`z`: a Mult-VAE's code of the items, trained on the other users' remaining histories)"
                  if data.get("encoder_input") == "mult_vae" else "") + "."
               ) if data.get("encoder_passes") else ""
    grouped = (f" Then {data['group_tokens']} group tokens: the {sum(data['group_sizes'])} users not probed put in "
               f"groups of {', '.join(map(str, data['group_sizes']))} by a whitened k-means of "
               + ("the pipeline's untrained `z`" if data["group_by"] == "items" else "a Mult-VAE's code")
               + " of their remaining items, "
               + ("then shuffled among those users (sizes kept: each token is trained on as many users drawn at "
                  "random, the shuffled-ID control), " if data.get("group_shuffle") else "")
               + (f"every group's token trained together for {data['group_passes']} passes over those users beside "
                  f"the shift, each on its batch-centred gradient (Adam"
                  + (f", step {data['group_learning_rate']:g}" if "group_learning_rate" in data else "")
                  + (f", the groups' offsets {data['group_offset_learning_rate']:g}"
                     if data.get("group_offset_learning_rate") not in (None, data.get("group_learning_rate")) else "")
                  + "; NLL per pass " + " -> ".join(f"{v:.4f}" for v in data["group_nll"])
                  if data.get("group_training") == "joint" else
                  f"each group's token the shift trained on for {data['group_passes']} "
                  f"passes over its users alone (a fresh Adam"
                  + (f", step {data['group_learning_rate']:g}" if "group_learning_rate" in data else "")
                  + "; NLL per pass and group "
                  + "; ".join(" -> ".join(f"{v:.4f}" for v in nll) for nll in data["group_nll"]))
               + f"); each probed user scored with the nearest code's group's token, and with the group whose token "
               f"explains a draw of their remaining text best (the same group for "
               f"{data['group_likeliest_is_nearest']:.0%} of them)"
               + (f", and best against how it explains every probed user's draw (the relatively likeliest; the "
                  f"nearest code's group for {data['group_relative_is_nearest']:.0%})"
                  if "group_relative_is_nearest" in data else "")
               + (f"; the same over the mean NLL of {pooled} draws of their remaining text (the first one the draw "
                  f"above; the nearest code's group for {data['group_relative_pooled_is_nearest']:.0%}, the first "
                  f"draw's choice for {data['group_relative_pooled_is_relative']:.0%})"
                  if "group_relative_pooled_is_nearest" in data else "")
               + ".") if data.get("group_tokens") else ""
    context = (f" With the shared token in place, the probed users' held-out text also read after the "
               f"{data.get('context_from', 'newest')} N tokens of "
               "their own remaining training text, or as many of another user's (N = "
               + ", ".join(f"{n}: {data['context_tokens_mean'][str(n)]:.0f} tokens on average" for n in data["context_tokens"])
               + ").") if data.get("context_tokens") else ""
    lines = [f"# What one soft token per profile carries ({data['record']['dataset']})", "",
             f"Produced by `python benchmarks/token_probe.py {' '.join(data['record']['command'][1:])}`. Settings "
             f"`{settings_fingerprint(settings)}`. The shared shift trained alone for "
             f"{data['shift_passes']} passes over {data['shift_users']} users"
             f"{trained_on(data.get('shift_objective'), data['shift_nll'])}.{encoder}{fitted}{grouped}{context} "
             f"The probed users are scored on "
             f"their newest training items within {data['holdout_tokens']} tokens ({data['held_out_tokens_mean']:.1f} "
             f"on average), which nothing was fitted on. "
             f"Plain NLL, nats per token (`rating_*`: over the held-out rating tokens alone); mean over users with its "
             f"95% interval. Took {data['seconds']:.0f} s.", "",
             "| tokens | NLL |", "|---|---|"]
    for mode, summary in sorted(modes.items(), key=lambda item: reading_order(item[0])):
        note = " (no LLM: a count model's nats per token; only differences compare)" if "count_" in mode else ""
        lines.append(f"| {mode}{note} | {summary['mean']:.4f} [{summary['ci'][0]:.4f}, {summary['ci'][1]:.4f}] |")
    lines += ["", "| paired difference | mean | 95% interval | users below 0 |", "|---|---|---|---|"]
    for keep in data.get("keep", []):
        mode = keep_mode(keep)
        labels[f"{mode}_minus_mean"] = f"own kept {keep:.0%}, shrunk {1 - keep:.0%} towards the mean - mean (held-out text)"
        labels[f"rating_{mode}_minus_rating_mean"] = (f"own kept {keep:.0%}, shrunk {1 - keep:.0%} towards the mean - "
                                                      f"mean (held-out rating tokens)")
    for key, summary in sorted(differences.items(), key=lambda item: reading_order(item[0])):
        lines.append(difference_row(labels.get(key, key), summary))
    if "own_minus_mean" in differences:
        lines += ["", goal_verdict(differences["own_minus_mean"], "The issue's goal for tokens fitted to each user alone",
                                   differences.get("own_minus_other_user"))]
    for objective in data.get("also_fit", []):
        if f"{objective}_own_minus_{objective}_mean" in differences:
            lines += ["", goal_verdict(differences[f"{objective}_own_minus_{objective}_mean"],
                                       f"The issue's goal for tokens fitted on {objective}",
                                       differences.get(f"{objective}_own_minus_{objective}_other_user"))]
    if "encoder_minus_encoder_mean" in differences and data.get("encoder_prefix") == "deep":
        # The deep encoder's S is trained beside W, so start + scale (S + W mean z) is a point no training chose:
        # one deep prompt trained alone as long (deep_shared) scored 0.14 nats/token better than it on the same
        # users (results/ml-100k/19ffcb34f8d2/token_probe_pair_deep_encoder_vs_shared_prompt_multvae.md).
        own_mean, own_other = differences["encoder_minus_encoder_mean"], differences["encoder_minus_encoder_other"]
        lines += ["", f"**The issue's goal for the deep encoder: not judged in this run** (own - the mean of the "
                      f"deep prompts {own_mean['mean']:+.4f}, interval [{own_mean['ci'][0]:+.4f}, "
                      f"{own_mean['ci'][1]:+.4f}]; own - another user's {own_other['mean']:+.4f}, interval "
                      f"[{own_other['ci'][0]:+.4f}, {own_other['ci'][1]:+.4f}]). The mean prompt is a point that no "
                      f"user is given and no training chose (`S` is trained beside `W`); the reference is one deep "
                      f"prompt trained as long on the same batches (`--encoder_prefix=deep_shared`), paired with this "
                      f"run user by user (`benchmarks/token_probe_pair.py`)."]
    elif "encoder_minus_encoder_mean" in differences and data.get("encoder_prefix") != "deep_shared":
        lines += ["", goal_verdict(differences["encoder_minus_encoder_mean"],
                                   "The issue's goal for the encoder trained at every batch",
                                   differences.get("encoder_minus_encoder_other"))]
    if "group_own_minus_group_mean" in differences:
        # The vector mean of a few group tokens is a point between them that no user is given: tokens
        # trained on random users beat it too (--group_shuffle), so the goal is judged against a random group's
        # token (group_any: the user's mean score over every group's token) where the run has it.
        vector_mean = differences["group_own_minus_group_mean"]
        caution = (" That mean is a vector average of a few tokens, a point between them that no user is given: tokens "
                   "trained on random users can beat it too (`--group_shuffle`), so it is not the goal's reference for "
                   "groups.")
        if random_group := differences.get("group_own_minus_group_any"):
            lines += ["", goal_verdict(random_group, "The issue's goal for one token per group of users",
                                       reference=("a random group's token (the user's mean over every group's token)",
                                                  "a random group's"))
                      + f" Own - the vector mean of the group tokens {vector_mean['mean']:+.4f} "
                        f"[{vector_mean['ci'][0]:+.4f}, {vector_mean['ci'][1]:+.4f}]." + caution]
        else:                               # runs before group_any was scored
            lines += ["", f"**The issue's goal for one token per group of users: not judged in this run** (own - the "
                          f"vector mean of the group tokens {vector_mean['mean']:+.4f}, interval "
                          f"[{vector_mean['ci'][0]:+.4f}, {vector_mean['ci'][1]:+.4f}])." + caution
                          + " Its reference, a random group's token, is scored by runs from 2026-12-07 on."]
        if part := differences.get("group_own_minus_group_own_additive"):
            # Not own - the next group's: the users sit unevenly in the groups, so that difference carries how good
            # each group's token is for everyone; own - its additive twin takes that out.
            low, high = part["ci"]
            lines[-1] += (f" The group's part alone (own - what the same token scores on a user of any group) "
                          f"{part['mean']:+.4f}, interval [{low:+.4f}, {high:+.4f}]: "
                          + ("the tokens carry the user's group." if high < 0 else "not shown."))
        if choice := differences.get("group_relative_part_minus_group_own_part"):
            low, high = choice["ci"]
            lines[-1] += (f" Chosen by likelihood against how each token explains every user (an E-step), the "
                          f"group's part minus the nearest code's {choice['mean']:+.4f} [{low:+.4f}, {high:+.4f}]: "
                          + against_the_code(choice) + ".")
        if choice := differences.get("group_relative_pooled_part_minus_group_own_part"):
            low, high = choice["ci"]
            gain = differences["group_relative_pooled_part_minus_group_relative_part"]
            lines[-1] += (f" The same E-step over {pooled} draws of each user's text: the group's part minus the "
                          f"nearest code's {choice['mean']:+.4f} [{low:+.4f}, {high:+.4f}]: "
                          + against_the_code(choice) + f"; minus the first draw's choice {gain['mean']:+.4f} "
                          f"[{gain['ci'][0]:+.4f}, {gain['ci'][1]:+.4f}].")
        if count := differences.get("count_group_own_minus_count_group_own_additive"):
            # the same matrix of groups by users from count models (no LLM): what a token per group could carry
            population = differences["count_group_own_minus_count_population"]
            lines[-1] += (f" With no LLM, the groups' own count models on the same users and items: the group's part "
                          f"{count['mean']:+.4f} [{count['ci'][0]:+.4f}, {count['ci'][1]:+.4f}], own group - the "
                          f"population {population['mean']:+.4f}; a count model of each user's own history as a set - "
                          f"the population {differences['count_set_minus_count_population']['mean']:+.4f}.")
    if trajectory := data.get("group_trajectory"):
        def cell(summary: dict | None) -> str:
            return f"{summary['mean']:+.4f} [{summary['ci'][0]:+.4f}, {summary['ci'][1]:+.4f}]" if summary else "-"

        count = data["group_trained_users_count_part"]
        every = data["group_score_every"]
        lines += ["", "The group's part (own group's token - its additive twin, 95% interval over users) as training "
                      "went on, " + ("after each pass" if every == 1 else f"every {every} passes")
                      + ": on the probed users' held-out text (new users, as above); on one draw of the remaining "
                      f"training text of {data['users']} of the users "
                      f"the tokens train on, fixed at the start (their own users, the kind of text trained on); and "
                      f"on those users' held-out newest items (their own users, items nothing trained on). With no "
                      f"LLM, the groups' count models' part on those users' held-out items: "
                      f"{cell(count['held_out'])}"
                      + (f" ({cell(count['rating_held_out'])} on the rating tokens)" if "rating_held_out" in count
                         else "") + "; on the probed users', above.", "",
                  "| passes | NLL of the pass | new users, held-out | its rating tokens | trained users, training "
                  "text | its rating tokens | trained users, held-out | its rating tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for entry in trajectory:
            lines.append(f"| {entry['passes']} | {data['group_nll'][entry['passes'] - 1]:.4f} | "
                         + " | ".join(cell(entry.get(prefix + name)) for name in
                                      ("held_out", "trained_users", "trained_users_held_out")
                                      for prefix in ("", "rating_")) + " |")
    if data.get("context_tokens"):
        lines += ["", "In context, own history - the shared token alone is what any such history adds (the kind of "
                      "text, its time) together with what this user's adds; own - another user's history of the same "
                      "length is the user's part alone: the most of the user the frozen LLM can use from this history, "
                      "beside the goal's 0.05 nats/token for two soft tokens."]
    lines += ["", "## Run", "", settings_table(data["record"])]
    return "\n".join(lines)
