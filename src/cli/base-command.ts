import { Command, Errors } from '@oclif/core';

/**
 * oclif's parse errors span several lines ("The following errors occurred: … See more help with
 * --help"); users get the substance on one line instead, plus the hint that names what to do.
 */
export function oneLineError(message: string): string {
  const lines = message
    .split('\n')
    .map((line) => line.replace(/^[\s›]+/, '').trim())
    .filter((line) => line && !/^The following errors? occurred:?$/.test(line));
  const help = lines.some((line) => /^See more help with --help/.test(line));
  const text = lines.filter((line) => !/^See more help with --help/.test(line)).join(' ');
  return help ? `${text} (see --help)` : text;
}

/** Every mirrord command: errors become one line on stderr and a non-zero exit, never a trace. */
export abstract class MirrordCommand extends Command {
  protected override async catch(error: Error & { oclif?: { exit?: number } }): Promise<void> {
    if (error instanceof Errors.ExitError) throw error;
    // A flag error ends parsing early; without this oclif adds a "did not parse" warning under
    // NODE_ENV=development or test, which would make the one line three.
    this.parsed = true;
    process.exitCode = error.oclif?.exit ?? 1;
    const line = oneLineError(error.message || String(error));
    if (this.jsonEnabled()) this.logJson({ error: line });
    else this.logToStderr(`mirrord: ${line}`);
  }
}
