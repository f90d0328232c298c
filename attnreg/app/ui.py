"""The Gradio page of `attnreg app`: inputs, the pair of images, the maps, the numbers, Stop and examples.

Every callback is a thin wrapper around `attnreg.app.logic.Engine`; this module only lays the page out
and turns results and errors into component updates. Generation events share one concurrency slot
(`concurrency_id="generate"`, limit 1) and the engine's lock: the CPU runs one job at a time, the other
tabs wait in the queue and see their position. The light events (suggestions, token table, Stop) skip
that queue.
"""

from __future__ import annotations

import html
import os
import threading
import traceback
from types import SimpleNamespace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402

from .logic import EMBEDDED_EXAMPLES, GENERIC_EXAMPLES, MAX_IMAGES, PRESET_CHOICES, Engine, Stopped  # noqa: E402

CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#status { min-height: 1.5em; }
#status.error, #status .error { color: var(--error-text-color); }
"""

def message_box(kind: str, text: str) -> str:
    """Markdown for the status line; the text is escaped (token tables hold <|startoftext|>)."""
    icon = {"error": "**Cannot run:**", "stopped": "**Stopped:**", "done": "**Done:**"}.get(kind, "")
    return f"{icon} {html.escape(text, quote=False)}"


class _Jobs:
    """The Stop button's flag per browser session (tab)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: dict[str, threading.Event] = {}

    def start(self, session: str) -> threading.Event:
        with self.lock:
            event = self.events[session] = threading.Event()
            return event

    def stop(self, session: str) -> bool:
        with self.lock:
            event = self.events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def end(self, session: str, event: threading.Event) -> None:
        with self.lock:
            if self.events.get(session) is event:
                del self.events[session]


def build(engine: Engine, title: str = "attnreg: Attention Regulation") -> gr.Blocks:
    """The page: inputs and the token table, the results, and the events that tie them to `engine`."""
    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# Attention Regulation\nOriginal and regulated images from the same noise, on {_model_line(engine)}. "
            "Attention Regulation (Zhang et al., ECCV 2024) edits the cross-attention of the target words "
            "during the first half of the steps so that each of them gets its own region of the image.")
        ui = _inputs(engine)
        ui.status = gr.Markdown(elem_id="status")
        _results(engine, ui)
        _typing_events(engine, ui)
        _run_events(engine, ui, EMBEDDED_EXAMPLES if engine.embedded else GENERIC_EXAMPLES)
    return demo


def _model_line(engine: Engine) -> str:
    if engine.embedded:
        return "the embedded shapes model (64 x 64; circles, squares, triangles in six colours)"
    return f"`{getattr(engine.pipe, 'name_or_path', '') or type(engine.pipe).__name__}`"


def _inputs(engine: Engine) -> SimpleNamespace:
    ui = SimpleNamespace(touched=gr.State(False))
    with gr.Row():
        with gr.Column(scale=3):
            ui.prompt = gr.Textbox(label="Prompt", placeholder="a red circle and a blue square", lines=1,
                                   max_lines=3, elem_id="prompt")
            ui.targets = gr.Textbox(label="Targets", info="comma-separated words of the prompt, suggested as you "
                                    "type (edit freely); empty: the prompt's nouns", elem_id="targets")
            ui.note = gr.Markdown("Type a prompt: its tokens and the suggested targets appear here.",
                                  elem_id="targets-note")
            with gr.Row():
                ui.seed = gr.Number(label="Seed", value=42, precision=0, minimum=0, elem_id="seed")
                ui.steps = gr.Number(label="Steps", value=engine.default_steps, precision=0, minimum=1, elem_id="steps")
                ui.guidance = gr.Number(label="Guidance (> 1)", value=engine.default_guidance, elem_id="guidance")
                ui.n_images = gr.Slider(label="Number of images", minimum=1, maximum=MAX_IMAGES, step=1, value=1,
                                        elem_id="n-images")
            ui.preset = gr.Radio(list(PRESET_CHOICES), value=PRESET_CHOICES[0], label="Preset (auto: layers and levels fitted "
                                 "to the model; paper: the authors' release)", elem_id="preset")
            with gr.Row():
                ui.run_btn = gr.Button("Generate", variant="primary", elem_id="run")
                ui.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
        with gr.Column(scale=2):
            ui.tokens = gr.Dataframe(headers=["index", "token", "target"], label="Tokens the text encoder sees",
                                     interactive=False, elem_id="tokens", wrap=True)
    return ui


def _results(engine: Engine, ui: SimpleNamespace) -> None:
    with gr.Column(visible=False, elem_id="results") as ui.results:
        ui.pair_rows, ui.images, ui.verdicts = [], [], []
        for k in range(MAX_IMAGES):
            with gr.Row(visible=k == 0) as row:
                for kind, label in (("original", "Original"), ("regulated", "Attention Regulation")):
                    with gr.Column():
                        ui.images.append(gr.Image(label=label, type="pil", format="png", height=256,
                                                  interactive=False, elem_id=f"{kind}-{k}",
                                                  elem_classes=["pixelated"], buttons=["download"]))
                        ui.verdicts.append(gr.Markdown(elem_id=f"verdict-{kind}-{k}", visible=engine.embedded))
            ui.pair_rows.append(row)
        gr.Markdown("### Attention of each target over the steps (the first pair)\n"
                    "Per shown step: the intermediate image and each target token's cross-attention map "
                    "(the edited layers' maps averaged; the number is the map's peak); original above, "
                    "regulated below.")
        ui.maps = gr.Image(label="maps", type="pil", format="png", interactive=False, elem_id="maps",
                           show_label=False, buttons=["download", "fullscreen"])
        ui.diagnosis = gr.Markdown(elem_id="diagnosis")
        ui.numbers = gr.Dataframe(label="explain.json in short: each word token's attention (peak = the largest "
                                  "pixel of its map; mean over the pixels and steps)", interactive=False,
                                  elem_id="numbers")
        with gr.Accordion("Token statistics (violin plots, the paper's Fig. 2)", open=False):
            ui.stats = gr.Image(type="pil", format="png", interactive=False, show_label=False, elem_id="stats")
        with gr.Accordion("explain.json", open=False):
            ui.raw = gr.JSON(elem_id="explain-json")


def _typing_events(engine: Engine, ui: SimpleNamespace) -> None:
    """As the user types: suggested targets (until the user edits them) and the token table."""

    def on_prompt(prompt_text, targets_text, was_touched):
        if not was_touched:
            targets_text = ", ".join(engine.suggest_targets(prompt_text))
        rows, line = engine.token_rows(prompt_text, targets_text)
        return targets_text, rows, html.escape(line, quote=False)

    def on_targets(prompt_text, targets_text):
        rows, line = engine.token_rows(prompt_text, targets_text)
        return rows, html.escape(line, quote=False)

    light = dict(concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")
    ui.prompt.change(on_prompt, [ui.prompt, ui.targets, ui.touched], [ui.targets, ui.tokens, ui.note], **light)
    ui.targets.input(lambda text: bool(text.strip()), [ui.targets], [ui.touched], queue=False, show_progress="hidden")
    ui.targets.change(on_targets, [ui.prompt, ui.targets], [ui.tokens, ui.note], **light)


def _run_events(engine: Engine, ui: SimpleNamespace, examples) -> None:
    """Generate (button, Enter, an example) one job at a time for the whole page; Stop ends this tab's."""
    jobs = _Jobs()
    outputs = [ui.status, ui.results, *ui.pair_rows, *ui.images, *ui.verdicts, ui.maps, ui.diagnosis, ui.numbers,
               ui.stats, ui.raw]

    def run(prompt_text, targets_text, seed_v, steps_v, guidance_v, preset_v, n_v,
            request: gr.Request, progress=gr.Progress()):
        session = getattr(request, "session_hash", None) or "anonymous"
        stop = jobs.start(session)

        def report(done, total, what):
            progress((done, total), desc=f"{what}: step {done + 1} of {total} (original, then regulated)",
                     unit="steps")

        try:
            result = engine.generate(prompt_text, targets_text, seed_v, steps_v, guidance_v, preset_v, n_v,
                                     progress=report, stop=stop)
        except Stopped as err:
            return {ui.status: message_box("stopped", str(err))}
        except ValueError as err:  # InputError, TargetError, GuidanceError, ConfigError, ...
            return {ui.status: message_box("error", str(err)), ui.results: gr.update(visible=False)}
        except Exception as err:  # noqa: BLE001 - the page stays up; the server log keeps the traceback
            traceback.print_exc()
            return {ui.status: message_box("error", f"unexpected {type(err).__name__}: {err} (the server log "
                                                    "has the details)"), ui.results: gr.update(visible=False)}
        finally:
            jobs.end(session, stop)
        return _updates(ui, result)

    inputs = [ui.prompt, ui.targets, ui.seed, ui.steps, ui.guidance, ui.preset, ui.n_images]
    gen = dict(concurrency_id="generate", concurrency_limit=1, show_progress="full")
    run_event = ui.run_btn.click(run, inputs, outputs, **gen)
    submit_event = ui.prompt.submit(run, inputs, outputs, **gen)
    ex = gr.Examples(examples, [ui.prompt, ui.targets, ui.seed], label="Examples (one click runs them with the "
                     "settings above)", elem_id="examples")
    example_event = ex.load_input_event.then(run, inputs, outputs, **gen)

    def on_stop(request: gr.Request):
        session = getattr(request, "session_hash", None) or "anonymous"
        stopped = jobs.stop(session)
        return message_box("stopped", "the run ends at its next step; the page is ready for the next one."
                           if stopped else "no run was in progress in this tab (one waiting in the queue is taken off it).")

    ui.stop_btn.click(on_stop, None, [ui.status], queue=False, show_progress="hidden",
                      cancels=[run_event, submit_event, example_event])


def _updates(ui: SimpleNamespace, result) -> dict:
    """The page's components for a finished result."""
    n = len(result.pairs)
    up = {ui.status: message_box(
        "done", f"{result.prompt!r}, seed {result.settings['seed']}, {result.settings['steps']} steps, "
        f"guidance {result.settings['guidance']:g}, preset {result.settings['preset']}; targets: "
        + ", ".join(f"{w} → {i}" for w, i in zip(result.targets['tokens'], result.targets['indices']))
        + f" ({result.targets['source']}); {result.seconds:.1f} s"), ui.results: gr.update(visible=True)}
    for k in range(MAX_IMAGES):
        up[ui.pair_rows[k]] = gr.update(visible=k < n)
        pair = result.pairs[k] if k < n else None
        for j, kind in enumerate(("original", "regulated")):
            image, text = ui.images[2 * k + j], ui.verdicts[2 * k + j]
            label = "Original" if kind == "original" else "Attention Regulation"
            if pair is None:
                up[image], up[text] = gr.update(value=None), gr.update(value="")
                continue
            up[image] = gr.update(value=getattr(pair, kind), label=f"{label} · seed {pair.seed}")
            up[text] = gr.update(value=pair.verdicts[kind].markdown if pair.verdicts else "")
    up[ui.maps] = result.maps
    up[ui.stats] = result.stats
    up[ui.diagnosis] = "\n".join(f"- {html.escape(line, quote=False)}" for line in result.diagnosis)
    up[ui.numbers] = gr.update(value=result.table, headers=result.table_headers)
    up[ui.raw] = result.numbers
    return up


def launch(engine: Engine, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, quiet: bool = False):
    """Serve the page on host:port; returns the Blocks (already serving when block is False)."""
    demo = build(engine)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=quiet,
                show_error=False, css=CSS, footer_links=[], ssr_mode=False, inbrowser=False)
    return demo
