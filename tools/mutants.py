"""Mutation check: plant known bugs in a copy of the repository and make sure the tests catch each.

    python tools/mutants.py              # every mutant; exit 1 if any survives
    python tools/mutants.py -k ddp soft  # the mutants whose names contain "ddp" or "soft"
    python tools/mutants.py --list       # names, files and the tests that must catch them

Each mutant is one or more exact text replacements in one file. A replacement must match
exactly once in the current code; when it does not (the code moved on), the script stops
with the mutant and the text it looked for, so the mutant is updated rather than silently
skipped. For each mutant the repository (without .git, virtual environments and caches) is
copied to a temporary folder, the bug is planted there, and the listed tests run with this
Python interpreter (`-m ''`, so slow tests listed by name run too). A mutant is killed when
pytest reports failing tests (exit status 1); any other outcome (all pass, collection error,
no tests) counts against it. The unmutated copy runs the same tests first: a failing
baseline makes every "killed" meaningless, so it stops the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", "*.egg-info",
                                "demo-output", "runs")


@dataclass
class Mutant:
    name: str
    file: str  # relative to the repository root
    replacements: list[tuple[str, str]]  # (exact old text, new text); each old text occurs once
    tests: list[str]  # pytest node ids or files that must fail
    why: str = ""
    notes: list[str] = field(default_factory=list)


T = "tests/"
MUTANTS = [
    # -- the four bugs of the audit (issue 10) ------------------------------------------
    Mutant("ddp-sum", "src/iqpir/training/distributed.py",
           [("    flat /= info.world_size\n", "")],
           [T + "test_distributed.py::test_average_gradients_is_the_exact_mean",
            T + "test_distributed.py::test_stage2_two_processes_equal_one"],
           "gradients summed instead of averaged across processes"),
    Mutant("ddp-none-as-zero", "src/iqpir/training/distributed.py",
           [("view_as(p).clone() if anywhere[i] else None", "view_as(p).clone()")],
           [T + "test_distributed.py::test_average_gradients_is_the_exact_mean"],
           "a parameter without a gradient on any rank gets a zero one (its Adam counts the step)"),
    Mutant("quality-sign", "src/iqpir/training/tasks.py",
           [("(1.0 - q)", "q")],
           [T + "test_training.py::test_quality_loss_is_one_minus_q_and_descends_to_higher_quality"],
           "stage-2 quality loss w*Q instead of w*(1-Q)"),
    Mutant("soft-hq-codebook", "src/iqpir/models/restorer.py",
           [("alpha * self._soft_codes(logits_hq, self.quantizer.hq,", "self._soft_codes(logits_hq, self.quantizer.common,")],
           [T + "test_models.py::test_soft_path_gradient_is_that_of_the_softmax_weighted_codebooks"],
           "HQ+ soft codes from the common codebook, alpha dropped"),
    Mutant("box-window", "src/iqpir/inference/restorer.py",
           [("    return ramp[:, None] * ramp[None, :]\n", "    return torch.ones(tile, tile)\n")],
           [T + "test_restore.py::test_tiles_blend_position_dependent_outputs_smoothly"],
           "tile blending with a box window"),
    # -- one per invariant added with them ----------------------------------------------
    Mutant("soft-temperature", "src/iqpir/models/restorer.py",
           [("softmax(logits / self.cfg.soft_temperature,", "softmax(logits,")],
           [T + "test_models.py::test_soft_path_gradient_is_that_of_the_softmax_weighted_codebooks"],
           "soft_temperature ignored"),
    Mutant("ddp-gan-weight", "src/iqpir/training/tasks.py",
           [("g_rec, g_gan = D.mean_across_ranks(g_rec), D.mean_across_ranks(g_gan)\n", "\n")],
           [T + "test_distributed.py::test_stage1_two_processes_equal_one"],
           "adaptive GAN weight from each rank's own gradients"),
    Mutant("ddp-disc-unsynced", "src/iqpir/training/loop.py",
           [("        for params in self.params.values():\n            D.average_gradients(params, info)\n",
             '        D.average_gradients(self.params["generator"], info)\n')],
           [T + "test_distributed.py::test_stage1_two_processes_equal_one"],
           "discriminator gradients not averaged across ranks"),
    Mutant("tile-quality", "src/iqpir/inference/restorer.py",
           [("out = self._run(tiles, quality, alpha", "out = self._run(tiles, 1.0, None")],
           [T + "test_restore.py::test_tiled_path_passes_quality_and_alpha"],
           "tiles restored at the default quality and alpha"),
    Mutant("tile-ramp", "src/iqpir/inference/restorer.py",
           [("0.5 - 0.5 * torch.cos(torch.pi * x)", "x")],
           [T + "test_restore.py::test_blend_window_ramp_values"],
           "linear ramp instead of the raised cosine"),
    Mutant("tile-overlap", "src/iqpir/inference/restorer.py",
           [("self.overlap = (self.tile or 0) // 2 if overlap is None", "self.overlap = (self.tile or 0) // 4 if overlap is None")],
           [T + "test_restore.py::test_tiles_blend_position_dependent_outputs_smoothly"],
           "the former quarter-tile overlap (the grid of issue 13 item 5)"),
    Mutant("ema-update", "src/iqpir/training/loop.py",
           [("alpha=1 - self.decay)", "alpha=self.decay)")],
           [T + "test_training.py::test_ema_update"],
           "EMA weights old and new swapped"),
    Mutant("ema-resume", "src/iqpir/training/loop.py",
           [('            self.ema.load_state_dict(tensors["ema"])\n', "            pass\n")],
           [T + "test_training.py::test_resume_is_exact"],
           "EMA not restored on --resume"),
    Mutant("piqe-reflect", "src/iqpir/iqa/piqe.py",
           [('(0, pw, 0, ph), mode="replicate")', '(0, pw, 0, ph), mode="reflect")')],
           [T + "test_iqa.py::test_piqe_pads_like_matlab"],
           "PIQE pads with reflected instead of replicated pixels"),
    Mutant("piqe-pooling", "src/iqpir/iqa/piqe.py",
           [("100.0 * (dist + 1.0) / (n_active + 1.0)", "100.0 * dist / n_active")],
           [T + "test_iqa.py::test_piqe_matches_matlab"],
           "PIQE pooled without the +1s of the published formula (-0.10, -0.08 points)"),
    Mutant("niqe-grey-weights", "src/iqpir/iqa/matlab.py",
           [("RGB2GRAY_WEIGHTS = (0.298936021293775, 0.587043074451121, 0.114020904255103)",
             "RGB2GRAY_WEIGHTS = (0.299, 0.587, 0.114)")],
           [T + "test_iqa.py::test_niqe_matches_live_release"],
           "Rec. 601 grey weights instead of MATLAB's (within the old rel 1e-3)"),
    Mutant("checkpoint-message", "src/iqpir/checkpoint.py",
           [('return CorruptCheckpointError(f"{file}: {what}', 'return CorruptCheckpointError(f"{what}')],
           [T + "test_checkpoint.py::test_corrupt_checkpoint_files_are_named"],
           "corrupt-checkpoint message without the file"),
    Mutant("checkpoint-raw-error", "src/iqpir/checkpoint.py",
           [("    except SafetensorError as exc:\n", "    except KeyError as exc:\n")],
           [T + "test_checkpoint.py::test_corrupt_checkpoint_files_are_named"],
           "a truncated .safetensors raises safetensors' own error (a traceback in the CLI)"),
    Mutant("degradation-order", "src/iqpir/data/degradations.py",
           [(('        gain = _uniform(generator, cfg.exposure, "lowlight.exposure")\n'
              '        gamma = _uniform(generator, cfg.gamma, "lowlight.gamma")\n'),
             ('        gamma = _uniform(generator, cfg.gamma, "lowlight.gamma")\n'
              '        gain = _uniform(generator, cfg.exposure, "lowlight.exposure")\n'))],
           [T + "test_data.py::test_seeded_output_is_pinned"],
           "the order of the random draws changed"),
    Mutant("degradation-shared-draws", "src/iqpir/data/degradations.py",
           [("def _uniform(generator: torch.Generator, values: Sequence[float], name: str) -> float:\n",
             ("def _uniform(generator: torch.Generator, values: Sequence[float], name: str) -> float:\n"
              "    generator = torch.Generator(generator.device).manual_seed(0)\n"))],
           [T + "test_data.py::test_batch_equals_samples_in_order"],
           "every sample of a batch draws the same parameters"),
    Mutant("codebook-init-copy", "src/iqpir/models/quantizer.py",
           [("            self.hq.init_from(z, generator)\n", "            self.hq.codebook.data.copy_(self.common.codebook)\n")],
           [T + "test_models.py::test_codebook_init_from_data_puts_every_code_near_an_encoder_output"],
           "the HQ+ codebook initialised as a copy of the common one"),
    # -- the released weights (issue 9): parity with the official networks' outputs -------
    Mutant("official-head-slots", "src/iqpir/official.py",
           [('out["transformer.head_hq.weight"] = t[0::2]', 'out["transformer.head_hq.weight"] = t[1::2]'),
            ('out["transformer.head_common.weight"] = t[1::2]', 'out["transformer.head_common.weight"] = t[0::2]')],
           [T + "test_official.py::test_released_weights_compute_what_the_official_code_computes[iqpir-S0.35]"],
           "the IQPIR head's (K, 2) slots read the wrong way round (HQ+ from the odd rows)"),
    Mutant("position-on-values", "src/iqpir/models/transformer.py",
           [("qkv = torch.cat([qk, F.linear(x, w[2 * d :], bias[2 * d :])], dim=-1)",
             "qkv = torch.cat([qk, F.linear(x + pos, w[2 * d :], bias[2 * d :])], dim=-1)")],
           [T + "test_official.py::test_released_weights_compute_what_the_official_code_computes[codeformer-w0.5]"],
           "the position embedding added to the values too (CodeFormer adds it to queries and keys only)"),
    Mutant("downsample-padding", "src/iqpir/models/vqgan.py",
           [("F.pad(x, (0, 1, 0, 1))", "F.pad(x, (1, 0, 1, 0))")],
           [T + "test_official.py::test_released_weights_compute_what_the_official_code_computes[codeformer-w0.5]"],
           "the stride-2 conv padded on the left and top instead of the right and bottom"),
    Mutant("cft-fidelity-dropped", "src/iqpir/models/cft.py",
           [("return dec + w * (dec * self.scale(h) + self.shift(h))", "return dec + (dec * self.scale(h) + self.shift(h))")],
           [T + "test_official.py::test_released_weights_compute_what_the_official_code_computes[codeformer-w0.5]"],
           "CodeFormer's fidelity weight w not applied in the CFT blocks"),
    Mutant("quality-bin-rounding", "src/iqpir/models/embedding.py",
           [("torch.floor(quality * self.bins)", "torch.round(quality * self.bins)")],
           [T + "test_official.py::test_released_weights_compute_what_the_official_code_computes[iqpir-S0.35]"],
           "the score bin rounded instead of floor(10 S)"),
    Mutant("adain-off", "src/iqpir/models/restorer.py",
           [("if self.cfg.adain if adain is None else adain:", "if adain:")],
           [T + "test_official.py::test_released_weights_compute_what_the_official_code_computes[iqpir-S0.35]"],
           "the model's AdaIN setting ignored (official inference re-normalises the code features)"),
    # -- whole photos with faces (issue 12) -----------------------------------------------
    Mutant("paste-off-by-one", "src/iqpir/faces/align.py",
           [("patch_to_crop = compose(out_to_crop, _translate(x0, y0))", "patch_to_crop = compose(out_to_crop, _translate(x0 + 1, y0))")],
           [T + "test_faces.py::test_pasted_marks_land_on_the_landmarks"],
           "the restored face pasted back one pixel to the right"),
    # -- memory of the CPU path (issue 15) -------------------------------------------------
    Mutant("official-copy-load", "src/iqpir/official.py",
           [(("    own = model.state_dict()\n"
              "    model.load_state_dict({k: _own_tensor(t, own[k]) for k, t in state.items()}, strict=True, assign=True)\n"),
             '    model = model.to_empty(device="cpu")\n    model.load_state_dict(state, strict=True)\n')],
           [T + "test_official.py::test_loading_assigns_the_files_tensors_and_computes_what_a_copy_computes"],
           "the file's tensors copied into a new network (the weights held twice)"),
    Mutant("official-assign-views", "src/iqpir/official.py",
           [(" or t.untyped_storage().nbytes() != t.nbytes:", ":")],
           [T + "test_official.py::test_loading_assigns_the_files_tensors_and_computes_what_a_copy_computes"],
           "a view assigned as a parameter pins the larger storage it is cut from"),
    Mutant("official-meta-left", "src/iqpir/official.py",
           [("    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):", "    if False:")],
           [T + "test_official.py::test_a_tensor_no_file_can_fill_is_an_error_not_left_on_meta"],
           "a tensor no state dict holds left on the meta device"),
    Mutant("fast-path-copy-kept", "src/iqpir/inference/engines.py",
           [("        self.fast = self.model if own else _with_children(self.model, **children)",
             "        self.fast = _with_children(self.model, **children)")],
           [T + "test_engines.py::test_an_owned_model_is_converted_in_place_without_float32_copies"],
           "an owned model's float32 encoder and decoder kept beside the bf16 ones"),
    Mutant("restorer-not-owned", "src/iqpir/inference/loader.py",
           [("engine=engine,\n                    own_model=True,", "engine=engine,\n                    own_model=False,")],
           [T + "test_engines.py::test_load_restorer_hands_its_model_over_to_the_fast_path"],
           "iqpir.load does not hand its network over (a float32 copy stays)"),
    Mutant("fast-path-autocast", "src/iqpir/inference/engines.py",
           [("        # embedding, the Transformer, the lookup, AdaIN) must stay float32.\n        return nullcontext()\n",
             ("        # embedding, the Transformer, the lookup, AdaIN) must stay float32.\n"
              "        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])\n"))],
           [T + "test_engines.py::test_the_fast_path_predicts_the_codes_in_float32"],
           "the fast path under autocast (the Transformer's logits in bf16)"),
    Mutant("in-place-skip-order", "src/iqpir/inference/engines.py",
           [("        return h.add_(self.skip(x))", "        return self.skip(x).add_(h)")],
           [T + "test_engines.py::test_in_place_residual_blocks_are_bit_identical_and_leave_their_input"],
           "the residual sum written into the block's input (identity skip)"),
    Mutant("user-model-classes", "src/iqpir/inference/engines.py",
           [("    twin = module if in_place else _share_tensors_copy(module)\n",
             ("    twin = module if in_place else _share_tensors_copy(module)\n"
              "    for m in module.modules():\n"
              "        if type(m) is ResBlock:\n"
              "            m.__class__ = InPlaceResBlock\n"))],
           [T + "test_engines.py::test_fast_path_is_close_to_float32_and_leaves_the_model_alone"],
           "the fast path changes the classes of a model it was not handed"),
    Mutant("auto-avx2-exact", "src/iqpir/inference/engines.py",
           [('    return device.type == "cpu" and devices.cpu_has_avx2_fma()\n', "    return False\n")],
           [T + "test_engines.py::test_auto_takes_the_fastest_path_each_cpu_has[avx2-only]"],
           "auto on an AVX2-only CPU runs the exact network (the slower one there)"),
    Mutant("float32-not-exact", "src/iqpir/inference/engines.py",
           [('    elif requested == "auto" and dtype == "float32" and described.bf16 and fast_float32(device):',
             '    elif dtype == "float32" and described.bf16 and fast_float32(device):')],
           [T + "test_engines.py::test_auto_takes_the_fastest_path_each_cpu_has[avx2-only]",
            T + "test_engines.py::test_float32_is_the_network_bit_for_bit"],
           "--dtype float32 runs the float32 fast path where auto would (no longer the exact network)"),
    # how codes learn and the stage-2 fidelity term (issue 11)
    Mutant("ema-decay-swapped", "src/iqpir/models/quantizer.py",
           [("self.code_sum.mul_(d).add_(sums.to(self.code_sum), alpha=1 - d)",
             "self.code_sum.mul_(1 - d).add_(sums.to(self.code_sum), alpha=d)")],
           [T + "test_codebook_learning.py::test_ema_moving_average_weights_old_and_new_by_the_decay"],
           "the moving average keeps the new batch instead of the history"),
    Mutant("stale-indices-after-learning", "src/iqpir/models/quantizer.py",
           [("            self._learn(z, indices, learn_mask)\n            indices = self.nearest(z.detach())\n",
             "            self._learn(z, indices, learn_mask)\n")],
           [T + "test_codebook_learning.py::test_output_is_the_lookup_of_the_returned_indices"],
           "the output is the lookup of codes that moved after their indices were chosen"),
    Mutant("hq-codes-learn-from-all", "src/iqpir/models/quantizer.py",
           [("hq = self.hq(z, learn_mask=mask)", "hq = self.hq(z)")],
           [T + "test_codebook_learning.py::test_hq_codebook_learns_only_from_the_masked_samples"],
           "the HQ+ codes learn from low-quality samples"),
    Mutant("cft-frozen-under-fidelity", "src/iqpir/training/tasks.py",
           [("            self.generator.cft.requires_grad_(True)\n", "            pass\n")],
           [T + "test_codebook_learning.py::test_fidelity_term_trains_the_cft_blocks_and_nothing_frozen"],
           "train.fidelity trains nothing"),
    # the layering of inference (issue 20): edges the import walker of tests/test_layout.py must see
    Mutant("layout-inference-imports-cli", "src/iqpir/inference/loader.py",
           [("    described = files.describe(path_or_name, use_ema=",
             "    from iqpir.cli import main  # noqa: F401\n\n    described = files.describe(path_or_name, use_ema=")],
           [T + "test_layout.py::test_inference_imports_nothing_above_it"],
           "a function-level import of the CLI inside inference"),
    Mutant("layout-export-imports-restorer", "src/iqpir/export.py",
           [("from iqpir.inference.files import ", "from iqpir.inference.restorer import load_restorer  # noqa: F401\n"
                                                  "from iqpir.inference.files import ")],
           [T + "test_layout.py::test_export_reads_models_through_inference_files_only"],
           "export.py reaching above inference/files.py"),
    Mutant("layout-cycle", "src/iqpir/official.py",
           [("    out = Path(out)\n    if out.exists() and list_checkpoints(out):",
             "    from iqpir.inference import files  # noqa: F401\n\n"
             "    out = Path(out)\n    if out.exists() and list_checkpoints(out):")],
           [T + "test_layout.py::test_no_import_cycle_in_the_package"],
           "a function-level import that closes a cycle (official -> inference.files -> official)"),
    Mutant("layout-engines-up", "src/iqpir/inference/engines.py",
           [("    described = as_described(model)\n",
             "    from iqpir.inference import restorer  # noqa: F401\n\n    described = as_described(model)\n")],
           [T + "test_layout.py::test_checkpoint_to_engine_goes_down_once"],
           "the engine layer importing the restorer above it"),
    # -- the packaged default model and its recipe (issue 21) ---------------------------------
    Mutant("resume-no-optimiser", "src/iqpir/training/loop.py",
           [('        self.optim.load(tensors, meta["optimizers"])\n', "")],
           [T + "test_default_model.py::test_resumed_training_equals_an_uninterrupted_run",
            T + "test_training.py::test_resume_is_exact"],
           "a resumed run restarts Adam's moments"),
    Mutant("default-batch-global-rng", "src/iqpir/training/default_model.py",
           [("    lq = degrade(torch.stack(clean), degradation, generator=g)\n",
             "    lq = degrade(torch.stack(clean), degradation, generator=None)\n")],
           [T + "test_default_model.py::test_batches_are_a_pure_function_of_seed_and_step"],
           "the training degradation drawn from the global generator (not a function of seed and step)"),
    Mutant("plugin-first-feature-only", "src/iqpir/plugin.py",
           [("        self._calls += 1\n        return output + self.condition(",
             "        self._calls += 1\n        if index > 0:\n            return output\n"
             "        return output + self.condition(")],
           [T + "test_plugin.py::test_several_features_each_get_their_own_condition"],
           "only the first of several conditioned features gets s(S)"),
    Mutant("default-quality-dropped", "src/iqpir/inference/engines.py",
           [('    return {"restored": net(x) if q is None else net(x, q)}',
             '    return {"restored": net(x, torch.ones_like(q)) if q is not None else net(x)}')],
           [T + "test_default_model.py::test_the_packaged_model_loads_without_a_path_and_restores"],
           "the quality a user asks for replaced by 1 on the way to a plug-in network"),
    Mutant("export-unet-fixed-size", "src/iqpir/export.py",
           [('        return {"image": {0: "batch", 2: "height", 3: "width"}, "quality": {0: "batch"},\n'
             '                "restored": {0: "batch", 2: "height", 3: "width"}}',
             '        return {"image": {0: "batch"}, "quality": {0: "batch"}, "restored": {0: "batch"}}')],
           [T + "test_default_model.py::test_a_unet_exports_to_onnx_at_any_size"],
           "a U-Net graph exported at the example's size only"),
    # -- one loop for every model: resume and precision -----------------------------------------
    Mutant("resume-no-rng", "src/iqpir/training/loop.py",
           [('        ckpt.set_rng_state(ckpt.unflatten_state(tensors["rng"], meta["rng"]))\n', "")],
           [T + "test_training.py::test_resume_restores_the_global_rng_and_the_clock"],
           "a resumed run does not restore the global RNG states"),
    Mutant("resume-batches-after-rng", "src/iqpir/training/loop.py",
           [("    batches = source.batches(start)\n    if existing:\n        state.load(existing[-1])\n",
             "    if existing:\n        state.load(existing[-1])\n    batches = source.batches(start)\n")],
           [T + "test_training.py::test_resume_restores_the_global_rng_and_the_clock"],
           "the batch source starts after the RNG restore (a DataLoader's seed draw shifts the stream)"),
    Mutant("resume-clock-reset", "src/iqpir/training/loop.py",
           [('        self.spent = {k: float(meta.get("elapsed", {}).get(k, 0.0)) for k in self.spent}\n', "")],
           [T + "test_training.py::test_resume_restores_the_global_rng_and_the_clock"],
           "a resumed run's time counts its last start only (the model card's training time)"),
    Mutant("precision-ignored", "src/iqpir/training/loop.py",
           [("enabled=dtype is not None)", "enabled=False)")],
           [T + "test_default_model.py::test_bf16_precision_computes_in_bf16_and_keeps_float32_master_weights"],
           "train.precision=bf16 trains in float32"),
    Mutant("precision-auto-everywhere", "src/iqpir/training/loop.py",
           [('    if precision == "bf16" or (precision == "auto" and native_bf16(device)):',
             '    if precision in ("bf16", "auto"):')],
           [T + "test_default_model.py::test_auto_precision_is_bf16_only_where_the_cpu_has_it"],
           "train.precision=auto takes bf16 on CPUs that only emulate it"),
    Mutant("batch-under-autocast", "src/iqpir/training/loop.py",
           [("            batch = next(batches)  # made outside autocast: the data do not depend on the precision\n"
             "            with self.autocast():\n                terms = self.task.losses(batch, step)\n",
             "            with self.autocast():\n                terms = self.task.losses(next(batches), step)\n")],
           [T + "test_default_model.py::test_bf16_precision_computes_in_bf16_and_keeps_float32_master_weights"],
           "the training data made under bf16 autocast (they change with the precision)"),
    Mutant("config-amp-unread", "src/iqpir/config.py",
           [("    data = _legacy_keys(dict(data))\n", "    data = dict(data)\n")],
           [T + "test_config.py::test_train_amp_of_earlier_runs_reads_as_precision"],
           "configs stored with train.amp by earlier checkpoints no longer load"),
    # -- schedules, randomness and encoder options at their edges (issue 25, item 3) --------------
    Mutant("warmup-off-by-one", "src/iqpir/training/loop.py",
           [("        return (step + 1) / cfg.warmup_steps\n", "        return step / cfg.warmup_steps\n")],
           [T + "test_training.py::test_lr_schedules_at_their_edges"],
           "the first warm-up step at lr 0, the last one short of lr"),
    Mutant("multistep-late", "src/iqpir/training/loop.py",
           [("sum(step >= m for m in cfg.milestones)", "sum(step > m for m in cfg.milestones)")],
           [T + "test_training.py::test_lr_schedules_at_their_edges"],
           "a multistep decay one step after its milestone"),
    Mutant("degrade-one-draw", "src/iqpir/data/degradations.py",
           [('    h = hashlib.sha256(f"iqpir-degrade:{int(seed)}:{digest}".encode()).digest()',
             '    h = hashlib.sha256(f"iqpir-degrade:{int(seed)}".encode()).digest()')],
           [T + "test_data.py::test_each_file_of_a_degrade_run_gets_its_own_draw"],
           "every file of a degrade run gets the same draw"),
    Mutant("webp-quality-dropped", "src/iqpir/io.py",
           [('    options = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}',
             '    options = {"quality": quality} if fmt in ("JPEG", "WEPB") else {}')],
           [T + "test_io.py::test_lossy_files_honour_their_quality"],
           "a format-name typo drops WebP's quality"),
    # -- engines tell the truth (issue 25, item 2) -------------------------------------------------
    Mutant("autocast-dropped", "src/iqpir/inference/engines.py",
           [('        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])\n',
             '        return nullcontext()\n')],
           [T + "test_engines.py::test_the_convolutions_compute_in_the_dtype_the_restorer_reports"],
           "--dtype bfloat16 reported for a plug-in network that computes in float32"),
    Mutant("mixed-parts-float32", "src/iqpir/inference/engines.py",
           [("            part = low_precision_copy(getattr(self.model, name), low, device, in_place=own)\n",
             "            part = low_precision_copy(getattr(self.model, name), torch.float32, device, in_place=own)\n")],
           [T + "test_engines.py::test_the_convolutions_compute_in_the_dtype_the_restorer_reports"],
           "the mixed path reports bf16 and keeps its convolutions in float32"),
    # -- knobs on every path (issue 25, item 1: the plug-in model's quality) -----------------------
    Mutant("faces-quality-dropped", "src/iqpir/inference/photos.py",
           [("            return restorer.restore(faces, quality=quality, alpha=alpha, fidelity=fidelity)",
             "            return restorer.restore(faces, quality=None, alpha=alpha, fidelity=fidelity)")],
           [T + "test_knobs.py::test_quality_reaches_the_output_on_every_path"],
           "--faces restores every face at the default quality, whatever --quality says"),
    Mutant("app-quality-dropped", "src/iqpir/app.py",
           [('        if self.model["supports_quality"] and p.quality is not None:\n            kw["quality"] = p.quality\n',
             '        if self.model["supports_quality"] and p.quality is not None:\n            kw["quality"] = 1.0\n')],
           [T + "test_knobs.py::test_quality_reaches_the_output_on_every_path"],
           "the page's quality slider replaced by 1 on its way to the model"),
    Mutant("app-faces-through-tiles", "src/iqpir/app.py",
           [(('            restore_faces = face_restorer_fn(self.restorer, kw.get("quality"), kw.get("alpha"), kw.get("fidelity"),\n'
              '                                             blend=blend)\n'),
             '            def restore_faces(crops):\n                return self.restorer.restore(crops, **kw)\n\n')],
           [T + "test_app.py::test_the_page_restores_faces_as_the_cli_does"],
           "the page restores face crops through a face model's tiles where the CLI resizes them"),
    # -- blending (issue 25, item 4) ---------------------------------------------------------------
    Mutant("blend-from-background", "src/iqpir/faces/align.py",
           [("    up = resized[:, uy0:uy1, ux0:ux1]\n", "    up = out[:, uy0:uy1, ux0:ux1]\n")],
           [T + "test_faces.py::test_with_a_background_function_the_face_blends_from_the_photo_into_the_background"],
           "the face blended into the background from the background, not from the photo"),
    # -- a checkpoint carries its inference defaults (issue 25, item 7) ----------------------------
    Mutant("checkpoint-w-forgotten", "src/iqpir/inference/files.py",
           [("                            default_fidelity=cfg.train.fidelity, trained=trained)", "trained={})")],
           [T + "test_inference_defaults.py::test_a_checkpoint_restores_at_the_fidelity_it_was_trained_at"],
           "a run trained at w = 1 restores at w = 0 (the CFT blocks it trained skipped)"),
    Mutant("app-faces-w-zero", "src/iqpir/app.py",
           [('face_restorer_fn(self.restorer, kw.get("quality"), kw.get("alpha"), kw.get("fidelity"),',
             'face_restorer_fn(self.restorer, kw.get("quality"), kw.get("alpha"), kw.get("fidelity", 0.0),')],
           [T + "test_inference_defaults.py"],
           "the page's face path restores at w = 0 when the form leaves fidelity out"),
    Mutant("graph-w-forgotten", "src/iqpir/export.py",
           [('trained={k: v for k, v in described.trained.items() if k != "fidelity" or fidelity})',
             'trained={k: v for k, v in described.trained.items() if k != "fidelity"})')],
           [T + "test_inference_defaults.py"],
           "an exported graph forgets the w its checkpoint was trained at (the knob rule reads `trained`)"),
    Mutant("metric-typo-imports-pyiqa", "src/iqpir/iqa/registry.py",
           [(("    if difflib.get_close_matches(base, [*BUILTIN_SCORERS, *known], n=1, cutoff=0.75):\n"
              "        raise unknown_metric_error(name, known)\n"), "")],
           [T + "test_iqa.py::test_a_typo_is_refused_without_importing_pyiqa"],
           "a metric typo imports pyiqa (10-20 s) before its did-you-mean error"),
    Mutant("page-download-stale", "src/iqpir/app_static/index.html",
           [('  $("download").setAttribute("aria-disabled", "true");\n  $("download").title', '  $("download").title')],
           [T + "test_app_browser.py"],
           "during a re-restore the page's Download saves the previous result"),
    Mutant("page-slider-silent", "src/iqpir/app_static/index.html",
           [("  if (state.busy) return;  // the running restore", "  return;  // the running restore")],
           [T + "test_app_browser.py"],
           "a slider moved before the first result does nothing, with no hint"),
    # -- the flag matrix (issue 25, item 1): options x paths --------------------------------------
    Mutant("faces-engine-dropped", "src/iqpir/cli.py",
           [("        **_restore_settings(args, _load(args, args.checkpoint)),\n        detector=",
             "        **_restore_settings(args, args.checkpoint),\n        detector=")],
           [T + "test_flag_matrix.py::test_every_option_on_every_path[engine-faces]"],
           "--faces accepts --engine and ignores it (the file loop loads the model with its own defaults)"),
    Mutant("aligned-one-by-one", "src/iqpir/inference/photos.py",
           [("            if len(pending) == restorer.batch_size:\n", "            if pending:\n")],
           [T + "test_flag_matrix.py::test_every_option_on_every_path[batch-size-aligned]"],
           "--aligned restores one file per forward pass whatever --batch-size says"),
    Mutant("faces-center-dropped", "src/iqpir/inference/photos.py",
           [("                                              only_center_face=only_center_face, min_face=min_face,\n"
             "                                              background=background,\n",
             "                                              only_center_face=False, min_face=min_face,\n"
             "                                              background=background,\n")],
           [T + "test_flag_matrix.py::test_every_option_on_every_path[only-center-face-faces]"],
           "--only-center-face parsed, then dropped on its way to the face pipeline"),
    Mutant("app-upscale-dropped", "src/iqpir/app.py",
           [("            original = _resize(img.rgb, p.upscale)\n", "            original = img.rgb\n")],
           [T + "test_flag_matrix.py::test_every_option_on_every_path[upscale-app]"],
           "the app's upscale field ignored without faces"),
    # -- what reaches the file (issue 23, items 5-7) ------------------------------------------------
    Mutant("faces-blend-dropped", "src/iqpir/inference/photos.py",
           [("        return finish.mix(restore(faces), faces)\n", "        return restore(faces)\n")],
           [T + "test_finish.py::test_blend_0_with_faces_leaves_the_photo_as_it_was"],
           "--blend accepted with --faces and ignored"),
    Mutant("grey-content-ignored", "src/iqpir/inference/photos.py",
           [('(self.colour == "auto" and img.grey_content)', '(self.colour == "auto" and img.grey)')],
           [T + "test_finish.py::test_grey_in_grey_out_and_the_two_overrides"],
           "a grey picture in a colour file comes back tinted"),
    Mutant("jpeg-tables-dropped", "src/iqpir/inference/photos.py",
           [("bits=img.bits, jpeg=img.jpeg, log=log,", "bits=img.bits, log=log,")],
           [T + "test_finish.py::test_a_jpeg_keeps_its_tables_and_what_is_not_restored_stays"],
           "a JPEG re-saved at quality 95, moving the pixels the model left alone"),
    Mutant("faces-alpha-dropped", "src/iqpir/inference/photos.py",
           [("    return None if alpha is None else resize_lanczos(alpha, upscale)", "    return None")],
           [T + "test_finish.py::test_blend_0_with_faces_leaves_the_photo_as_it_was"],
           "--faces drops a photo's transparency at --upscale 1"),
    # -- upscalers through spandrel (issue 23, items 1-4) -------------------------------------------
    Mutant("weights-unpickled-with-code", "src/iqpir/checkpoint.py",
           [('torch.load(Path(path), map_location="cpu", weights_only=True)',
             'torch.load(Path(path), map_location="cpu", weights_only=False)')],
           [T + "test_upscalers.py::test_a_pickle_that_runs_code_is_refused"],
           "a .pth is unpickled with code execution"),
    Mutant("upsampler-scale-kept", "src/iqpir/inference/photos.py",
           [("        return rescale(restorer.restore_one(image), (h * upscale, w * upscale))\n",
             "        return restorer.restore_one(image)\n")],
           [T + "test_upscalers.py::test_bg_upsampler_with_faces_restores_the_background"],
           "an upscaler's native scale kept where --upscale asks for another"),
    Mutant("face-upsample-dropped", "src/iqpir/inference/photos.py",
           [("save_faces=save_faces, draw_box=draw_box, face_upsample=faces_up)", "save_faces=save_faces, draw_box=draw_box)")],
           [T + "test_upscalers.py::test_face_upsample_pastes_faces_from_the_upscaled_crop"],
           "--face-upsample accepted and ignored"),
    # -- videos (issue 22) ---------------------------------------------------------------------------
    Mutant("video-cut-short-passed", "src/iqpir/inference/video.py",
           [("            if length and end < length - 0.25:", "            if False:")],
           [T + "test_video.py::test_bad_clips_get_one_line_and_leave_nothing"],
           "a clip cut short is written as if it were whole"),
    Mutant("video-sound-dropped", "src/iqpir/inference/video.py",
           [("                        out.mux(packet)\n                    continue", "                    continue")],
           [T + "test_video.py::test_every_frame_restored_at_its_time_and_the_sound_copied"],
           "the audio stream is dropped (CodeFormer's video script)"),
    Mutant("video-times-renumbered", "src/iqpir/inference/video.py",
           [("    new.pts, new.time_base = frame.pts, frame.time_base", "    new.pts = None")],
           [T + "test_video.py::test_variable_frame_rate_keeps_each_frame_time"],
           "frames get new, evenly spaced timestamps (a variable-rate clip changes its timing)"),
    Mutant("track-no-hold", "src/iqpir/faces/track.py",
           [("            elif t.misses < self.max_misses:", "            elif False:")],
           [T + "test_track.py::test_a_missed_face_is_held_then_dropped_and_identities_follow_overlap"],
           "a face the detector misses for one frame is dropped (and found again as a new one)"),
    Mutant("track-stride-ignored", "src/iqpir/faces/track.py",
           [("        if step % self.stride and self.tracks:", "        if False:")],
           [T + "test_track.py::test_detection_on_a_stride_and_held_between"],
           "--detect-every accepted and ignored: the detector runs on every frame"),
    Mutant("track-not-smoothed", "src/iqpir/faces/track.py",
           [("OneEuro(self.rate, self.min_cutoff, self.beta) if self.smooth else None",
             "None")],
           [T + "test_track.py::test_the_tracker_smooths_landmarks_unless_told_not_to"],
           "the landmarks are not smoothed over time"),
    Mutant("video-rotation-lost", "src/iqpir/inference/video.py",
           [("                vout.set_display_rotation(info[\"rotation\"])", "                pass")],
           [T + "test_video.py::test_a_portrait_clip_keeps_its_rotation"],
           "a phone's portrait clip comes back lying on its side"),
    # -- sharded batch jobs (issue 24, item 4) -------------------------------------------------------
    Mutant("shard-everything-everywhere", "src/iqpir/inference/photos.py",
           [("        paths = [p for p in paths if shard_owner(p, world) == rank]\n", "")],
           [T + "test_shard.py::test_two_ranks_restore_each_file_once_and_as_one_process_does"],
           "every rank of a torchrun job restores every input"),
    Mutant("int8-encoder-quantised", "src/iqpir/quantize.py",
           [("    float_convs = _encoder_convolutions(model, graph) if float_encoder else []",
             "    float_convs = []")],
           [T + "test_int8.py::test_the_int8_graph_predicts_the_float_graphs_codes_exactly"],
           "the int8 graph quantises the encoder too, so the codes are no longer the float graph's"),
    Mutant("warm-start-ignored", "src/iqpir/training/default_model.py",
           [("        if init is not None and not existing:  # a resumed run takes", "        if False:  # a resumed run takes")],
           [T + "test_default_model.py::test_a_sitting_warm_starts_from_weights_and_its_card_counts_all_steps"],
           "a sitting meant to warm-start from the packaged weights trains from a random network"),
    Mutant("clean-inputs-ignored", "src/iqpir/training/default_model.py",
           [("    if cfg.data.clean_inputs > 0:  # drawn after", "    if False:  # drawn after")],
           [T + "test_default_model.py::test_clean_inputs_come_back_as_themselves_at_any_s"],
           "data.clean_inputs accepted and ignored: clean photos are still trained towards degraded targets"),
    Mutant("bar-counts-skipped", "src/iqpir/inference/photos.py",
           [("    todo = [p for p in paths if overwrite or not log.complete(targets[p])]\n    left = set(todo)",
             "    todo = list(paths)\n    left = {p for p in paths if overwrite or not log.complete(targets[p])}")],
           [T + "test_outputs.py::test_the_progress_bar_counts_only_the_files_restored"],
           "the progress bar (and its rate) runs over the files a rerun skips"),
    Mutant("nan-weights-loaded", "src/iqpir/inference/files.py",
           [("            _refuse_non_finite(described, path)\n", "")],
           [T + "test_outputs.py::test_non_finite_weights_are_refused_at_load_naming_the_tensor"],
           "a checkpoint with NaN weights loads and writes black photos reported as done"),
    Mutant("damaged-model-traceback", "src/iqpir/inference/files.py",
           [("    except Exception as exc:  # noqa: BLE001 - each reader raises its own kind for a damaged file\n",
             "    except ZeroDivisionError as exc:\n")],
           [T + "test_damaged_models.py::test_a_damaged_model_file_is_one_line_naming_it"],
           "a model file cut short ends in the reader's traceback instead of one line naming it"),
    Mutant("int8-full-8-bit-weights", "src/iqpir/quantize.py",
           [("preset=nncf.QuantizationPreset.MIXED, advanced_parameters=_no_overflow(nncf),",
             "preset=nncf.QuantizationPreset.MIXED,")],
           [T + "test_int8.py::test_the_int8_graph_quantises_the_decoder_convolutions_only_and_records_its_fidelity"],
           "full 8-bit weights past the first layer: u8 x s8 sums saturate on CPUs without VNNI"),
    Mutant("int8-stale-cache-used", "src/iqpir/quantize.py",
           [("    if not graph.int8 or graph.int8.get(\"weights_sha256\") != sha or", "    if not graph.int8 or")],
           [T + "test_int8.py::test_the_cached_graph_is_reused_and_a_stale_one_made_again"],
           "a cached int8 graph recorded for other weights is used"),
    Mutant("int8-cache-ignores-cft", "src/iqpir/quantize.py",
           [("{'-cft' if cft else ''}.xml", ".xml")],
           [T + "test_int8.py::test_a_fidelity_above_zero_gets_a_graph_with_the_cft_blocks"],
           "the graphs with and without the CFT blocks share one cache entry"),
    Mutant("int8-swaps-the-upsampler", "src/iqpir/inference/loader.py",
           [('    if dtype != "int8" or files.exports(described) is None:', '    if dtype not in ("int8", "auto"):')],
           [T + "test_upscalers.py::test_a_cached_int8_graph_leaves_a_bg_upsampler_restore_alone"],
           "a plain --bg-upsampler restore looks up an int8 graph (none can be made of an upscaler)"),
    Mutant("int8-auto-uses-the-cache", "src/iqpir/inference/loader.py",
           [('    if dtype != "int8" or files.exports(described) is None:',
             '    if dtype not in ("int8", "auto") or files.exports(described) is None:')],
           [T + "test_int8.py::test_auto_never_runs_an_int8_graph_an_earlier_run_cached"],
           "auto runs (or makes) the int8 graph, so the same command gives other pixels after a --dtype int8 run"),
    # -- one loader, one knob rule (issue 30) -------------------------------------------------
    Mutant("knob-checkpoint-beats-flag", "src/iqpir/inference/knobs.py",
           [("    if flag is not None:\n        value = check_flag",
             "    if flag is not None and name not in described.trained:\n        value = check_flag")],
           [T + "test_knob_rule.py::test_flag_beats_the_checkpoint_which_beats_the_default"],
           "the checkpoint's trained value wins over the flag"),
    Mutant("knob-zero-flag-ignored", "src/iqpir/inference/knobs.py",
           [("    if flag is not None:\n        value = check_flag", "    if flag:\n        value = check_flag")],
           [T + "test_knob_rule.py::test_flag_beats_the_checkpoint_which_beats_the_default"],
           "a flag of 0 (--fidelity 0, --alpha 0, --blend 0) falls through to the checkpoint's value"),
    Mutant("knob-checkpoint-ignored", "src/iqpir/inference/knobs.py",
           [("    if trained is not None and supports(described, name):", "    if False:")],
           [T + "test_knob_rule.py::test_flag_beats_the_checkpoint_which_beats_the_default",
            T + "test_loader.py::test_each_kind_of_file_loads_through_iqpir_load_with_its_description"],
           "the checkpoint's trained values are passed over for the model's defaults"),
    Mutant("blend-recorded-as-flag", "src/iqpir/cli.py",
           [("finish=Finish(blend=args.blend,", "finish=Finish(blend=1.0 if args.blend is None else args.blend,")],
           [T + "test_knob_rule.py::test_the_same_restore_on_every_path"],
           "the CLI records a blend nobody gave as a flag"),
    Mutant("int8-python-refused", "src/iqpir/inference/loader.py",
           [('    if dtype != "int8" or files.exports', '    if dtype != "auto" or files.exports')],
           [T + "test_int8.py::test_int8_works_from_python_as_from_the_cli"],
           "iqpir.load(dtype='int8') raises (only the CLI knew how to make the int8 graph)"),
    Mutant("int8-fresh-graph-runs-float32", "src/iqpir/quantize.py",
           [("        graph.opened = None  # what read_graph read", "        # what read_graph read")],
           [T + "test_knob_rule.py::test_the_same_restore_on_every_path[int8-no flags]"],
           "a freshly made int8 graph runs the float32 model its reader kept open"),
    Mutant("cli-backend-dropped", "src/iqpir/cli.py",
           [('    return args.engine or args.backend or "auto"', '    return args.engine or "auto"')],
           [T + "test_loader.py::test_the_former_cli_flag_backend_still_works_with_a_warning"],
           "the former --backend flag is accepted and ignored"),
    Mutant("loader-bypassed", "src/iqpir/faces/detect.py",
           [("        state = read_pickled_tensors(weights)", "        state = torch.load(weights, weights_only=True)")],
           [T + "test_loader.py::test_model_files_are_opened_by_the_loader_only"],
           "a module reads weights itself, outside the loader's modules"),
    Mutant("graph-trained-forgotten", "src/iqpir/export.py",
           [('trained={k: v for k, v in described.trained.items() if k != "fidelity" or fidelity})', "trained={})")],
           [T + "test_loader.py::test_each_kind_of_file_loads_through_iqpir_load_with_its_description[onnx graph]"],
           "an exported graph forgets which knob values the checkpoint was trained at"),
    Mutant("default-name-unknown", "src/iqpir/inference/files.py",
           [("    if path == DEFAULT_NAME and not Path(path).exists():", "    if False:")],
           [T + "test_loader.py::test_each_kind_of_file_loads_through_iqpir_load_with_its_description[packaged default model]"],
           "`iqpir model-info --checkpoint default` cannot read the packaged default model"),
    Mutant("shard-merge-own-part-only", "src/iqpir/iqa/table.py",
           [("            parts = table_parts(out_p)\n            if statuses is None:",
             "            parts = [part_path(out_p, 0, world)]\n            if statuses is None:")],
           [T + "test_shard.py::test_a_rank_with_a_bad_file_names_it_the_other_finishes_and_a_rerun_skips",
            T + "test_shard.py::test_torchrun_score_merges_into_the_one_process_table"],
           "rank 0 merges only its own part of a sharded score table (the others' rows are dropped)"),
    Mutant("shard-merge-unwritten", "src/iqpir/iqa/table.py",
           [("    if todo or parts or previous_normalization != job.normalization", "    if todo or previous_normalization != job.normalization")],
           [T + "test_shard.py::test_a_rank_with_a_bad_file_names_it_the_other_finishes_and_a_rerun_skips",
            T + "test_shard.py::test_ranks_without_a_rendezvous_score_parts_that_merge_into_the_one_process_table"],
           "parts with nothing new to score are removed without their rows reaching the table"),
    Mutant("video-one-frame-per-pass", "src/iqpir/inference/video.py",
           [("                    if len(pending) >= batch_size:\n", "                    if pending:\n")],
           [T + "test_video.py::test_several_frames_per_forward_pass"],
           "--batch-size accepted for a clip and ignored: one frame per forward pass"),
    Mutant("cli-threads-spin", "src/iqpir/cli.py",
           [('    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")\n', "")],
           [T + "test_cli.py::test_the_cli_lets_waiting_threads_sleep_unless_told"],
           "the CLI leaves OpenMP's threads spinning (1.19x slower beside a busy process)"),
    Mutant("video-colour-ignored", "src/iqpir/inference/photos.py",
           [("        return io.to_grey(out).expand(3, -1, -1) if grey else out", "        return out")],
           [T + "test_video.py::test_clip_frames_follow_blend_and_colour_and_video_flags_need_a_clip"],
           "--grayscale accepted for a clip and ignored"),
    Mutant("video-flags-on-photos", "src/iqpir/inference/photos.py",
           [("    if given and not any(video.is_video(p) for p in paths):", "    if False:")],
           [T + "test_video.py::test_clip_frames_follow_blend_and_colour_and_video_flags_need_a_clip"],
           "--crf accepted for photos and ignored"),
    # -- nothing lost on real collections (issue 31) ------------------------------------------------
    Mutant("layout-names-only", "src/iqpir/io.py",
           [("        rel = Path(os.path.abspath(src)).relative_to(shared if root is None else os.path.abspath(root))\n",
             "        rel = Path(src.name)\n")],
           [T + "test_outputs.py::test_same_names_under_a_glob_are_mirrored_and_resumed_by_path"],
           "a glob's matches keep their names only: same-named photos from two folders share one output"),
    Mutant("layout-clash-ignored", "src/iqpir/io.py",
           [("    clashes = {dst: srcs for dst, srcs in taken.items() if len(srcs) > 1}\n", "    clashes = {}\n")],
           [T + "test_outputs.py::test_inputs_that_would_share_an_output_are_refused_before_any_work"],
           "two inputs that map to one output are not refused: one is lost (skipped or replaced)"),
    Mutant("write-unverified", "src/iqpir/io.py",
           [("        if size != len(data) or digest != want:\n", "        if False:\n")],
           [T + "test_outputs.py::test_a_file_that_does_not_read_back_as_written_is_refused_and_removed"],
           "a file that did not reach the disk as encoded is put in place and counted as done"),
    Mutant("write-temp-left", "src/iqpir/io.py",
           [("    except OSError as exc:\n        Path(tmp).unlink(missing_ok=True)\n        raise write_error(p, exc) from None\n",
             "    except OSError as exc:\n        raise write_error(p, exc) from None\n")],
           [T + "test_outputs.py::test_a_full_disk_stops_with_one_line_leaves_no_partial_file_and_a_rerun_finishes"],
           "a full disk leaves the half-written temporary file behind"),
    Mutant("stale-temps-kept", "src/iqpir/io.py",
           [("        _remove_stale_temps(p)\n        tmp = _temp_file(p)\n", "        tmp = _temp_file(p)\n")],
           [T + "test_outputs.py::test_an_interrupted_write_leaves_nothing_and_stale_temps_are_cleaned"],
           "temporary files of a killed run stay behind for ever"),
    Mutant("resume-trusts-existing", "src/iqpir/io.py",
           [("        logged = self.entries.get(self._key(target))\n", "        return True\n")],
           [T + "test_outputs.py::test_a_rerun_redoes_outputs_that_are_not_complete"],
           "a rerun skips any file at the output's path, a truncated one included"),
    Mutant("non-finite-written", "src/iqpir/inference/restorer.py",
           [("        if not bool(torch.isfinite(out).all()):", "        if False:")],
           [T + "test_outputs.py::test_a_non_finite_output_fails_its_file_and_writes_nothing"],
           "a model output of NaN is clamped and written as a black image, and counted as restored"),
    Mutant("frames-first-only", "src/iqpir/io.py",
           [("            if frames > 1:", "            if False:")],
           [T + "test_outputs.py::test_a_file_of_several_frames_is_refused_not_cut_to_its_first"],
           "an animated GIF or a multi-page TIFF comes back as its first frame"),
    Mutant("unreadable-folder-silent", "src/iqpir/io.py",
           [("os.walk(folder, onerror=failed, followlinks=True)", "os.walk(folder, followlinks=True)")],
           [T + "test_outputs.py::test_an_unreadable_folder_is_named_and_fails_the_run"],
           "a subfolder that cannot be read is skipped without a word, and the run exits 0"),
    Mutant("ignored-uncounted", "src/iqpir/io.py",
           [("            (found if is_image_path(q) else ignored).append(q)\n",
             "            if is_image_path(q):\n                found.append(q)\n")],
           [T + "test_outputs.py::test_files_that_are_not_images_are_counted_by_extension_and_named_with_verbose"],
           "files of other types in an input folder are dropped without being counted"),
    Mutant("sigterm-kills", "src/iqpir/cli.py",
           [("        self.previous = signal.signal(signal.SIGTERM, handler)\n", "        self.previous = None\n")],
           [T + "test_outputs.py::test_a_signal_keeps_the_scored_rows_and_says_so_in_the_exit_status"],
           "SIGTERM ends `iqpir score` at once, losing every row it had scored"),
    Mutant("metadata-dropped", "src/iqpir/inference/photos.py",
           [("                              metadata=kept)", "                              metadata=None)")],
           [T + "test_outputs.py::test_exif_icc_and_xmp_travel_to_the_output_with_the_orientation_reset"],
           "outputs lose the capture date, camera, colour profile and XMP of their inputs"),
    # -- the web app under abuse (issue 31) ---------------------------------------------------------
    Mutant("app-slot-before-body", "src/iqpir/app.py",
           [("        t_arrived = time.perf_counter()\n        deadline = ",
             "        t_arrived = time.perf_counter()\n        if not queue.try_admit():\n"
             "            return error(RequestError(503, 'busy'))\n        deadline = "),
            ("        if not queue.try_admit():\n            wait = queue.retry_after()\n",
             "        if False:\n            wait = queue.retry_after()\n")],
           [T + "test_app.py::test_slow_senders_are_dropped_after_the_body_timeout_and_never_hold_a_slot"],
           "a request takes a restore slot before its body has arrived: slow senders hold every slot"),
    Mutant("app-no-body-timeout", "src/iqpir/app.py",
           [("            async with asyncio.timeout_at(deadline):\n", "            async with asyncio.timeout(None):\n")],
           [T + "test_app.py::test_slow_senders_are_dropped_after_the_body_timeout_and_never_hold_a_slot"],
           "a client that trickles its body is never dropped"),
    Mutant("app-oversize-read-whole", "src/iqpir/app.py",
           [("                if received > _drain_limit(limits):\n                    break\n", "")],
           [T + "test_app.py::test_an_oversized_body_is_refused_while_it_streams_in"],
           "an oversized body is read to its end before the 413"),
    Mutant("app-any-host", "src/iqpir/app.py",
           [("        return name in self.names or (self.any_address and _is_ip(name))\n", "        return True\n")],
           [T + "test_app.py::test_a_foreign_host_is_refused_and_loopback_names_are_answered"],
           "a request for Host: rebind.example is served (DNS rebinding)"),
    Mutant("app-any-origin", "src/iqpir/app.py",
           [("    if origin is None:\n        return True\n    parts = urlsplit", "    return True\n    parts = urlsplit")],
           [T + "test_app.py::test_a_post_from_another_origin_is_refused_and_one_without_origin_is_served"],
           "a page of another site may post to the app"),
    Mutant("app-filename-raw", "src/iqpir/app.py",
           [("quote(stem + suffix, safe='')", "stem + suffix")],
           [T + "test_app.py::test_a_cyrillic_upload_downloads_under_its_own_name"],
           "a non-ASCII upload name put raw into the Content-Disposition header (a 500)"),
    Mutant("page-filename-ascii", "src/iqpir/app_static/index.html",
           [("  if (star) {\n", "  if (false) {\n")],
           [T + "test_app_browser.py"],
           "the page saves a Cyrillic upload's result under the ASCII fallback name"),
    Mutant("app-memory-kept", "src/iqpir/app.py",
           [("RestoreQueue(limits.queue, on_idle=release_freed_memory)", "RestoreQueue(limits.queue)")],
           [T + "test_app.py::test_the_app_gives_its_memory_back_after_a_request"],
           "the app holds a large photo's peak memory after the request"),
]


def _apply(root: Path, m: Mutant) -> None:
    path = root / m.file
    text = path.read_text()
    for old, new in m.replacements:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"mutants: {m.name}: expected the text once in {m.file}, found it {n} times:\n{old!r}\n"
                             "update the mutant to the current code")
        text = text.replace(old, new)
    path.write_text(text)


def _pytest(root: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    # Its own --basetemp: pytest prunes old folders under the shared default one, which other
    # pytest processes of the same user may do while this one runs.
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "", "-p", "no:cacheprovider",
           f"--basetemp={root.parent / 'pytest'}", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def _copy(dest: Path) -> Path:
    root = dest / "repo"
    shutil.copytree(ROOT, root, ignore=IGNORE)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", nargs="*", default=[], help="run only mutants whose names contain one of these")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    p.add_argument("--each", action="store_true",
                   help="run each listed test on its own: a mutant is killed only if every one of them fails")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.k or any(k in m.name for k in args.k)]
    if not chosen:
        raise SystemExit(f"mutants: no mutant matches {args.k}")
    if args.list:
        for m in chosen:
            print(f"{m.name:26} {m.file}: {m.why}\n{'':26} caught by {', '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="iqpir-mutants-") as tmp:
        clean = _copy(Path(tmp) / "clean")
        for m in chosen:  # every target text must be there before anything runs
            text = (clean / m.file).read_text()
            for old, _ in m.replacements:
                if text.count(old) != 1:
                    _apply(clean, m)  # raises with the details
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            t0 = time.perf_counter()
            rc, last = _pytest(clean, tests, args.timeout * 2)
            print(f"baseline: {len(tests)} tests, {last} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if rc != 0:
                print("mutants: the unmutated code fails these tests; fix that first", file=sys.stderr)
                return 2
        rows = []
        print(f"{'mutant':26} {'result':9} {'seconds':>7}  pytest", flush=True)
        for i, m in enumerate(chosen):
            root = _copy(Path(tmp) / f"m{i}")
            _apply(root, m)
            t0 = time.perf_counter()
            runs = [_pytest(root, [t], args.timeout) for t in m.tests] if args.each else [_pytest(root, m.tests, args.timeout)]
            seconds = time.perf_counter() - t0
            codes = {rc for rc, _ in runs}
            last = " | ".join(line for _, line in runs)
            result = "killed" if codes == {1} else "SURVIVED" if 0 in codes else f"ERROR({max(codes)})"
            rows.append((m.name, result))
            print(f"{m.name:26} {result:9} {seconds:7.1f}  {last}", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    alive = [n for n, r in rows if r != "killed"]
    print(f"{len(rows) - len(alive)} of {len(rows)} mutants killed" + (f"; not killed: {', '.join(alive)}" if alive else ""))
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
