import { fstatSync } from 'node:fs';

/** One of the app's output streams. */
export type AppStream = 'stdout' | 'stderr';

/**
 * How long an unfinished line of the app's may take to be finished before the status is drawn
 * below it. Most unfinished chunks are a line in pieces (a pipe's read cut it, or the app
 * writes a line in parts) and end within a few milliseconds: waiting for the newline keeps the
 * status out of the row the app is writing. A line left unfinished for longer is a prompt or a
 * progress line ("\r"): the status then goes on the row below, and the cursor stays where the
 * app left it, so the app's next bytes and the user's typing land where they would without
 * mirrord.
 */
const UNFINISHED_LINE_WAIT_MS = 200;

/** Erases from the cursor to the end of the screen: the status is always at or below it. */
const ERASE_BELOW = '\x1b[J';
const SAVE_CURSOR = '\x1b7';
const RESTORE_CURSOR = '\x1b8';
/** Down a row, in the same column; at the bottom the screen scrolls up. */
const INDEX = '\x1bD';
/** Up a row, in the same column. */
const REVERSE_INDEX = '\x1bM';

/** process.stdout or process.stderr. */
type StdioStream = NodeJS.WriteStream & { fd: number };

function sameTerminal(a: StdioStream, b: StdioStream): boolean {
  if (!a.isTTY || !b.isTTY) return false;
  return fstatSync(a.fd).rdev === fstatSync(b.fd).rdev;
}

/**
 * The session's terminal (stderr): a live status below everything else, mirrord's own notes, and
 * the app's output (the streams that show on the same terminal, piped through here) above it.
 *
 * Where the status is: right after a newline, on the cursor's row, with the cursor left at the
 * start of it, where the next line will be written; after an unfinished line of the app's (see
 * UNFINISHED_LINE_WAIT_MS), on the row below, the cursor left at the end of the app's line. In
 * both cases erasing to the end of the screen (from the start of its row when it has one of its
 * own) removes it without touching anything the app wrote before. It is always shorter than the
 * terminal is wide, so it never wraps: a wrapped status would leave rows behind each time a
 * resize or an erase of one row missed them.
 *
 * When stderr is not a terminal, nothing is drawn: notes are plain lines and the app's output is
 * not taken at all (see appStreams), so it reaches its stdout and stderr unchanged.
 */
export class SessionTerminal {
  readonly #stdout: NodeJS.WriteStream;
  readonly #stderr: NodeJS.WriteStream;
  readonly #live: boolean;
  readonly #stdoutOnTerminal: boolean;
  #render: ((columns: number) => string) | undefined;
  #drawn = false;
  /** The app's last byte on the terminal was not a newline. */
  #midLine = false;
  /** Set while an unfinished line of the app's may still be finished: nothing is drawn. */
  #lineWait: NodeJS.Timeout | undefined;
  /** Notes that came during the wait, printed after it (not into the app's line). */
  #heldNotes: string[] = [];
  #finished = false;
  readonly #onResize = (): void => this.#redraw();

  constructor(streams: { stdout: StdioStream; stderr: StdioStream } = process) {
    this.#stdout = streams.stdout;
    this.#stderr = streams.stderr;
    this.#live = streams.stderr.isTTY === true;
    this.#stdoutOnTerminal = this.#live && sameTerminal(streams.stdout, streams.stderr);
    if (this.#live) this.#stderr.on('resize', this.#onResize);
  }

  /** Whether a status is drawn live: stderr is a terminal. */
  get live(): boolean {
    return this.#live;
  }

  /**
   * The app's streams that must come through {@link writeApp}: those that show on the status's
   * terminal. The others should be the CLI's own, inherited by the app.
   */
  appStreams(): Record<AppStream, boolean> {
    return { stdout: this.#stdoutOnTerminal, stderr: this.#live };
  }

  /** The status to show from now on, rendered for a width (see formatStatus). */
  setStatus(render: (columns: number) => string): void {
    this.#render = render;
    this.#redraw();
  }

  /** A line of mirrord's own, for good: above the status, and never inside an app's line. */
  note(line: string): void {
    if (!this.#live || this.#finished) {
      this.#stderr.write(`${this.#live ? this.#newRow() : ''}${line}\n`);
      return;
    }
    if (this.#lineWait) {
      this.#heldNotes.push(line);
      return;
    }
    this.#stderr.write(`${this.#erase()}${this.#newRow()}${line}\n${this.#draw()}`);
  }

  /** A chunk of the app's output, passed on as is, with the status erased around it. */
  writeApp(from: AppStream, chunk: Buffer): void {
    const stream = from === 'stdout' ? this.#stdout : this.#stderr;
    const onTerminal = from === 'stderr' ? this.#live : this.#stdoutOnTerminal;
    if (!onTerminal || chunk.length === 0) {
      stream.write(chunk);
      return;
    }
    // Both are the same terminal, and writes to a terminal are synchronous in Node: the erase
    // reaches it before the chunk.
    const erase = this.#erase();
    if (erase) this.#stderr.write(erase);
    stream.write(chunk);
    this.#midLine = chunk[chunk.length - 1] !== 0x0a;
    clearTimeout(this.#lineWait);
    this.#lineWait = undefined;
    if (this.#finished) return;
    if (this.#midLine) {
      this.#lineWait = setTimeout(() => {
        this.#lineWait = undefined;
        this.#afterLine();
      }, UNFINISHED_LINE_WAIT_MS);
    } else {
      this.#afterLine();
    }
  }

  /**
   * Ends the live status: erases it and prints `line` (the session's last) for good. Call it
   * once the app's output has all been written.
   */
  finish(line?: string): void {
    if (this.#finished) return;
    this.#finished = true;
    clearTimeout(this.#lineWait);
    this.#lineWait = undefined;
    this.#stderr.off('resize', this.#onResize);
    const lines = [...this.#heldNotes.splice(0), ...(line === undefined ? [] : [line])];
    if (!this.#live) {
      if (lines.length) this.#stderr.write(lines.map((l) => `${l}\n`).join(''));
      return;
    }
    const erase = this.#erase();
    const text = lines.length ? `${this.#newRow()}${lines.map((l) => `${l}\n`).join('')}` : '';
    if (erase || text) this.#stderr.write(erase + text);
  }

  /** The app's line is finished, or was left unfinished long enough: held notes, then the status. */
  #afterLine(): void {
    const notes = this.#heldNotes.splice(0);
    const text = notes.length ? `${this.#newRow()}${notes.map((l) => `${l}\n`).join('')}` : '';
    const out = text + this.#draw();
    if (out) this.#stderr.write(out);
  }

  #redraw(): void {
    if (!this.#live || this.#lineWait || this.#finished) return;
    const out = this.#erase() + this.#draw();
    if (out) this.#stderr.write(out);
  }

  /** Erases the status, if it is drawn. */
  #erase(): string {
    if (!this.#drawn) return '';
    this.#drawn = false;
    // On its own row, from the row's start: what the terminal echoed there (a typed key, "^C")
    // moved the cursor into it. Below the app's line, from the cursor: its start is the app's.
    return this.#midLine ? ERASE_BELOW : `\r${ERASE_BELOW}`;
  }

  /**
   * A newline when the app left its line unfinished, so that a note starts a row of its own.
   * Only notes do this, after the wait: what the app adds to its line later starts below them.
   */
  #newRow(): string {
    if (!this.#midLine) return '';
    this.#midLine = false;
    return '\n';
  }

  /** Draws the status where it belongs (see the class comment). */
  #draw(): string {
    if (!this.#render || this.#finished) return '';
    const line = this.#render(this.#stderr.columns || 80);
    this.#drawn = true;
    if (!this.#midLine) return `${ERASE_BELOW}${line}\r`;
    // Index and back first, so that the row below exists (the screen scrolls at the bottom)
    // before the cursor is saved: a saved position is a place on the screen, not in the text.
    return `${INDEX}${REVERSE_INDEX}${SAVE_CURSOR}${INDEX}\r${ERASE_BELOW}${line}${RESTORE_CURSOR}`;
  }
}
