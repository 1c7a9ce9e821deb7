"""The chat command's loop: streamed answers, slash commands, one-shot prompts and piped stdin."""

import signal
import sys

from rich.console import Console
from rich.markup import escape

from macft import device
from macft.cpu.process import describe as describe_backend
from macft.data.encode import has_chat_template
from macft.errors import MacftError
from macft.inference.chat import ChatSession
from macft.runs.model import load_run_model

HELP = """\
[bold]/reset[/]            start a new conversation (the system prompt stays)
[bold]/system[/] [TEXT]    show the system prompt, set it to TEXT, or clear it with /system none
[bold]/temp[/] X           sampling temperature (0 = greedy); also /top-p X, /max-tokens N
[bold]/compare[/] on|off   answer with the base and the fine-tune, one after the other
[bold]/save[/] FILE [base] append this conversation to FILE as one JSONL line that
                   macft train reads (the fine-tune's side unless `base` is given)
[bold]/history[/]          the conversation so far;  [bold]/prompt[/]  the exact text last given to the model
[bold]/help[/]             this list;  [bold]/quit[/]  leave (or Ctrl-D).  Ctrl-C stops an answer."""


def answer(session: ChatSession, user: str, out: Console, info: Console) -> bool:
    """Stream each side's answer; False when Ctrl-C stopped it (then no side keeps the turn)."""
    sides = session.sides()
    for n, side in enumerate(sides):
        if len(sides) > 1:
            out.print(f"[bold cyan]── {side.name} ──[/]")
        device.reset_peak_memory()
        gen, last = session.stream(side, user), None
        try:
            for last in gen:
                out.out(last.text, end="", highlight=False)
                out.file.flush()
        except KeyboardInterrupt:
            gen.close()
            for done in sides[:n]:
                del done.messages[-2:]  # keep the sides' histories in step
            out.out("")
            info.print("[yellow]stopped[/]: this exchange is not kept in the history")
            return False
        out.out("")
        if last is not None:
            cut = " (cut at max tokens)" if last.finish_reason == "length" else ""
            info.print(
                f"[dim]{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
                f"prompt {last.prompt_tokens} tokens, peak memory {_size(last.peak_memory)}{cut}[/]"
            )
    return True


def _size(gb: float) -> str:
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB"


def _number(arg: str, kind, name: str, lo: float, hi: float | None = None):
    try:
        value = kind(arg)
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise MacftError(f"{name} takes a number {rng}, not {arg!r}")
    return value


def command(session: ChatSession, line: str, console: Console) -> bool:
    """Run one slash command; False means leave the chat."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name in ("/help", "/?"):
        console.print(HELP)
    elif name == "/reset":
        session.reset()
        console.print("[dim]new conversation[/]")
    elif name == "/system":
        if arg:
            session.system = None if arg.lower() == "none" else arg
        console.print(f"[dim]system prompt: {escape(session.system or '(none)')}[/]")
    elif name == "/temp":
        session.temp = _number(arg, float, "/temp", 0.0, 10.0)
        console.print(f"[dim]temperature {session.temp:g}[/]")
    elif name == "/top-p":
        session.top_p = _number(arg, float, "/top-p", 0.0, 1.0)
        console.print(f"[dim]top-p {session.top_p:g}[/]")
    elif name == "/max-tokens":
        session.max_tokens = _number(arg, int, "/max-tokens", 1)
        console.print(f"[dim]max tokens {session.max_tokens}[/]")
    elif name == "/compare":
        if arg not in ("on", "off"):
            raise MacftError("use /compare on or /compare off")
        if not session.has_adapters:
            raise MacftError("no adapters loaded, nothing to compare; chat with a run folder")
        session.set_compare(arg == "on")
        console.print(f"[dim]compare {arg}[/]")
    elif name == "/save":
        path, _, which = arg.partition(" ")
        if not path:
            raise MacftError("/save needs a file name: /save chats.jsonl")
        side = session.base if which.strip() == "base" else None
        saved, dropped = session.save(path, side)
        skipped = f" ({dropped} empty answers left out)" if dropped else ""
        console.print(f"[dim]saved {saved} exchanges to {escape(path)}{skipped}[/]")
    elif name == "/history":
        for side in session.sides():
            console.print(f"[bold cyan]── {side.name} ──[/]")
            for m in session.conversation(side):
                console.print(f"[bold]{m['role']}:[/] {escape(m['content'])}")
    elif name == "/prompt":
        for side in session.sides():
            console.print(f"[bold cyan]── {side.name} ──[/]")
            console.out(side.last_prompt or "(nothing asked yet)", highlight=False)
    else:
        raise MacftError(f"unknown command {name}; /help lists them")
    return True


def _input_prompt(console: Console) -> str:
    """The REPL prompt; importing readline gives input() line editing and arrow-key history."""
    try:
        import readline
    except ImportError:
        return ">>> "
    # \001 and \002 tell GNU readline that the colour codes take no room; libedit (macOS's
    # system Python) may print them, so it gets a plain prompt.
    colour = console.color_system and not console.no_color  # NO_COLOR, --no-color
    if colour and "libedit" not in (readline.__doc__ or ""):
        return "\001\x1b[1;32m\002>>>\001\x1b[0m\002 "
    return ">>> "


def repl(session: ChatSession, console: Console) -> None:
    console.print("[dim]type a message; /help for commands, /quit or Ctrl-D to leave[/]")
    # A process started while its parent ignored SIGINT inherits that (C's system() ignores it
    # while its command runs, e.g. while MLX builds a kernel): Ctrl-C would never stop an answer.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # input() prints the prompt itself: with readline, only once the terminal is set up, so
    # keys typed before that are not lost.
    prompt = _input_prompt(console)
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(session, line, console):
                    return
            else:
                answer(session, line, console, console)
        except MacftError as e:
            console.print(f"[red]Error:[/] {escape(str(e))}")


def run_chat(
    target, model, checkpoint, compare, prompt, system, sampling: dict, out: Console, err: Console
) -> None:
    """Load, then answer --prompt once, answer each piped stdin line, or run the REPL.

    Answers go to `out`; in a script, loading and speed lines go to `err`."""
    interactive = prompt is None and sys.stdin.isatty()
    info = out if interactive else err
    with info.status(f"loading {escape(str(target or model))} ..."):
        cm = load_run_model(target, model, checkpoint)
    what = f"{cm.base_path} + adapters {cm.adapters}" if cm.adapters else cm.base_path
    info.print(f"[bold]macft chat[/] {escape(what)}   backend: {describe_backend()}")
    for note in cm.notes:
        info.print(f"[yellow]note:[/] {escape(note)}")
    session = ChatSession(cm, system=system, **sampling)
    if compare:
        if not session.has_adapters:
            raise MacftError(
                f"--compare needs a run folder with adapters; {target or model} is a plain model"
            )
        session.set_compare(True)
    if session.system:
        info.print(f"[dim]system prompt: {escape(session.system)}[/]")
    if not has_chat_template(cm.tokenizer):
        info.print("[yellow]note:[/] no chat template: the model sees the turns' text run together")
    if interactive:
        repl(session, out)
        return
    if prompt is not None:
        prompts = [sys.stdin.read() if prompt == "-" else prompt]
    else:
        prompts = [line.strip() for line in sys.stdin if line.strip()]  # one prompt per line
    for text in prompts:
        session.reset()  # piped prompts are independent questions
        if not answer(session, text, out, info):
            raise KeyboardInterrupt
