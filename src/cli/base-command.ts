import { Command, Errors, type Hook } from '@oclif/core';
import { distance } from 'fastest-levenshtein';

/**
 * mirrord's exit codes, one rule for every command (README, "Exit codes"): a failure is 1; bad
 * input (a flag, an argument, mirrord.json, an unknown command, a COMMAND that cannot be run)
 * is 2; an interrupt (Ctrl-C) is 130, as a shell reports a program that SIGINT ended.
 */
export const EXIT = { failure: 1, usage: 2, interrupted: 130 } as const;

/** Bad input, which the user fixes on the command line or in mirrord.json: exit code 2. */
export class UsageError extends Error {
  /**
   * The line as it was written: oclif rewrites the message of an error thrown while it parses a
   * flag ("Parsing --pod \n\t…").
   */
  readonly line: string;

  constructor(line: string) {
    super(line);
    this.line = line;
  }
}

/**
 * The candidate `typed` most likely meant: the only one it begins, else one a typo or two away
 * (edits: a character added, removed or changed).
 */
export function closest(typed: string, candidates: string[]): string | undefined {
  const extended = candidates.filter((candidate) => candidate.startsWith(typed));
  if (typed.length > 1 && extended.length === 1) return extended[0];
  const near = candidates
    .map((candidate) => ({
      candidate,
      edits: distance(typed, candidate),
      lengthChange: Math.abs(candidate.length - typed.length),
    }))
    .filter(({ edits }) => edits <= Math.min(2, Math.floor(typed.length / 3)))
    // Two neighbours swapped count as two edits: at the same count, a candidate of the typed
    // length (a swap, a wrong key) is the likelier typo than one that adds and changes.
    .sort((a, b) => a.edits - b.edits || a.lengthChange - b.lengthChange);
  return near[0]?.candidate;
}

/**
 * oclif's words for a bad command line, and mirrord's. Value errors of mirrord's own flag types
 * are written in mirrord's words already (UsageError); these are the errors oclif itself raises.
 */
const OCLIF_WORDING: [RegExp, (match: string[]) => string][] = [
  [/^Flag (--\S+) expects a value/, ([, flag]) => `${flag} needs a value`],
  [
    /^Flag (--\S+) expects one of these values: (.*)/,
    ([, flag, values]) => `${flag} needs one of ${values}`,
  ],
  [/^Flag (--\S+) can only be specified once/, ([, flag]) => `give ${flag} once`],
  [
    /^Expected (--\S+)=(.*) to be one of: (.*)/,
    ([, flag, value, values]) => `${flag} "${value}" is not one of ${values}`,
  ],
  [
    /^--(\S+?)=\S* cannot also be provided when using --(\S+)/,
    ([, second, first]) => `give --${first} or --${second}, not both`,
  ],
  [/^Exactly one of the following must be provided: (.*)/, ([, flags]) => `give one of ${flags}`],
  [/^Missing required flag (\S+)/, ([, flag]) => `give --${flag}`],
  [/^Missing \d+ required args?:?\s*(\S*)/, ([, arg]) => `missing argument ${arg}`.trim()],
  [/^Unexpected arguments?: (.*)/, ([, args]) => `unexpected argument ${args}`],
  [/^Nonexistent flags?: (.*)/, ([, flags]) => `no such flag ${flags}`],
  [
    /^Parsing (--\S+)\s+Expected an integer but received: (.*)/,
    ([, flag, value]) => `${flag} "${value}" is not a whole number`,
  ],
  [
    /^Parsing (--\S+)\s+Expected an integer greater than or equal to (\S+) but received: (.*)/,
    ([, flag, min, value]) => `${flag} must be ${min} or more, not ${value}`,
  ],
  [
    /^Parsing (--\S+)\s+Expected an integer less than or equal to (\S+) but received: (.*)/,
    ([, flag, max, value]) => `${flag} must be ${max} or less, not ${value}`,
  ],
  [/^Parsing (--\S+)\s+(.*)/, ([, flag, reason]) => `${flag}: ${reason}`],
];

/**
 * Any error's message as one line: oclif's spread over several ("The following errors
 * occurred: … See more help with --help") and in its own words, in mirrord's.
 */
export function oneLineError(message: string): string {
  const text = message
    .split('\n')
    .map((line) => line.replace(/^[\s›]+/, '').trim())
    .filter(
      (line) =>
        line &&
        !/^The following errors? occurred:?$/.test(line) &&
        !/^See more help with --help/.test(line),
    )
    .join(' ');
  for (const [pattern, reword] of OCLIF_WORDING) {
    const match = pattern.exec(text);
    if (match) return reword([...match]);
  }
  return text;
}

/** An error as the one line mirrord prints (without `mirrord: `) and the exit code it ends with. */
export function describeError(error: Error & { oclif?: { exit?: number } }): {
  line: string;
  exit: number;
} {
  if (error instanceof UsageError) return { line: error.line, exit: EXIT.usage };
  return {
    line: oneLineError(error.message || String(error)),
    exit: error.oclif?.exit ?? EXIT.failure,
  };
}

/**
 * bin/run.js's handler for what no command caught (an unknown command, an error of a plugin's
 * command): oclif's own prints it in its words (" ›   Error: …").
 */
export function exitWithError(error: Error & { oclif?: { exit?: number } }): void {
  if (error instanceof Errors.ExitError) {
    process.exitCode = error.oclif.exit;
    return;
  }
  const { line, exit } = describeError(error);
  // A plugin's command-line error (oclif exits 2 for those) says only what is wrong.
  const hint = exit === EXIT.usage && !(error instanceof UsageError) ? ': see mirrord --help' : '';
  process.stderr.write(`mirrord: ${line}${hint}\n`);
  process.exitCode = exit;
}

/** The way a user types a command id (oclif keeps `plugins:install` for `plugins install`). */
const spoken = (id: string): string => id.replaceAll(':', ' ');

/**
 * oclif's command_not_found hook (package.json, oclif.hooks): `mirrord bogus`, or arguments to
 * a command that takes none, which oclif reads as a longer command id (`demo extra`).
 */
export const commandNotFound: Hook<'command_not_found'> = async function ({ id, config }) {
  const words = id.split(':');
  for (let length = words.length - 1; length > 0; length--) {
    const command = config.findCommand(words.slice(0, length).join(':'));
    if (command) {
      const extra = words.slice(length).join(' ');
      const name = spoken(command.id);
      throw new UsageError(
        `${name} takes no arguments, not "${extra}": see ${config.bin} ${name} --help`,
      );
    }
  }
  const visible = config.commands.filter((command) => !command.hidden).map((c) => spoken(c.id));
  const guess = closest(spoken(id), visible);
  const hint = guess ? ` (did you mean "${guess}"?)` : '';
  throw new UsageError(`no command "${spoken(id)}"${hint}: see ${config.bin} --help`);
};

/** Every mirrord command: errors become one line on stderr and the exit code of EXIT. */
export abstract class MirrordCommand extends Command {
  protected override async catch(error: Error & { oclif?: { exit?: number } }): Promise<void> {
    if (error instanceof Errors.ExitError) throw error;
    // Every command parses its flags first: an error before that is in the command line.
    const badInput = !this.parsed;
    // A flag error ends parsing early; without this oclif adds a "did not parse" warning under
    // NODE_ENV=development or test, which would make the one line three.
    this.parsed = true;
    const { line, exit } = badInput ? this.commandLineError(error) : describeError(error);
    process.exitCode = exit;
    // Also with --json, where oclif's logToStderr says nothing: the line is for the person.
    process.stderr.write(`mirrord: ${line}\n`);
    this.reportErrorAsJson(line);
  }

  /** The error for a --json reader too, on stdout; oclif's --json prints it as `{ error }`. */
  protected reportErrorAsJson(line: string): void {
    if (this.jsonEnabled()) this.logJson({ error: line });
  }

  /** A command-line error of this command, with what to do about it. */
  private commandLineError(error: Error & { flags?: string[] }): { line: string; exit: number } {
    if (error instanceof UsageError) return { line: error.line, exit: EXIT.usage };
    const name = `${this.config.bin} ${spoken(this.id ?? '')}`.trim();
    const unknown = error.flags?.[0];
    if (unknown !== undefined) {
      const flags = Object.keys(this.ctor.flags ?? {}).map((flag) => `--${flag}`);
      const guess = closest(unknown, flags);
      const hint = guess ? `did you mean ${guess}?` : `see ${name} --help`;
      return { line: `${spoken(this.id ?? '')} has no flag ${unknown}: ${hint}`, exit: EXIT.usage };
    }
    return { line: `${oneLineError(error.message)}: see ${name} --help`, exit: EXIT.usage };
  }
}
