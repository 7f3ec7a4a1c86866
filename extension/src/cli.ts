/**
 * The mirrord CLI this extension runs: where it is, and running it. The extension never does
 * what the CLI does; it starts it and reads its JSON.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/** Written by the build (scripts/build-extension.sh): the CLI of the repository it was built in. */
const REPOSITORY_FILE = join(__dirname, 'repository.json');

/** How a CLI is started: a program, and the arguments that come before mirrord's own. */
export interface Cli {
  file: string;
  prefix: string[];
}

/**
 * The CLI to run: `configured` (the mirrord.cliPath setting), else the CLI of the repository
 * this extension was built from when it is still there (a developer's build, and the tests),
 * else `mirrord` on PATH.
 */
export function findCli(configured: string): Cli {
  if (configured) return cliAt(configured);
  try {
    const { cli } = JSON.parse(readFileSync(REPOSITORY_FILE, 'utf8')) as { cli?: string };
    if (cli && existsSync(cli)) return cliAt(cli);
  } catch {
    // A packaged extension built elsewhere has none: PATH's.
  }
  return { file: 'mirrord', prefix: [] };
}

/**
 * A `.js` entry point runs on the extension host's own Node: VS Code's is Electron, which
 * behaves as Node with ELECTRON_RUN_AS_NODE (set by `run`).
 */
function cliAt(path: string): Cli {
  return path.endsWith('.js')
    ? { file: process.execPath, prefix: [path] }
    : { file: path, prefix: [] };
}

/** The line for a CLI that could not be started (spawn's `error` event). */
export function startFailure(cli: Cli, error: NodeJS.ErrnoException): string {
  return error.code === 'ENOENT'
    ? `the mirrord CLI (${cli.file}) was not found: install it, or set mirrord.cliPath`
    : `cannot run the mirrord CLI (${cli.file}): ${error.message}`;
}

/** The CLI's one-line error, without its `mirrord: ` prefix. */
export class CliError extends Error {}

/** Starts the CLI with `args` in `cwd` (where it finds the workspace's mirrord.json). */
export function run(
  cli: Cli,
  args: string[],
  cwd: string | undefined,
): ChildProcessWithoutNullStreams {
  return spawn(cli.file, [...cli.prefix, ...args], {
    cwd,
    env: { ...process.env, ELECTRON_RUN_AS_NODE: '1' },
  });
}

/** The CLI's lines on stderr, each without its `mirrord: ` prefix. */
export function cliLines(text: string): string[] {
  return text
    .split('\n')
    .map((line) => line.replace(/^mirrord: /, '').trim())
    .filter(Boolean);
}

/**
 * Runs a command with --json to its end and gives its JSON answer; its failure is a CliError
 * with the CLI's own line (`{ "error": … }` on stdout, else its last line on stderr).
 */
export async function runJson<T>(cli: Cli, args: string[], cwd: string | undefined): Promise<T> {
  const child = run(cli, [...args, '--json'], cwd);
  child.stdin.end();
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', (error: NodeJS.ErrnoException) =>
      reject(new CliError(startFailure(cli, error))),
    );
    child.once('close', resolve);
  });
  let answer: unknown;
  try {
    answer = JSON.parse(stdout);
  } catch {
    answer = undefined;
  }
  if (code === 0 && answer !== undefined) return answer as T;
  const error = (answer as { error?: unknown } | undefined)?.error;
  throw new CliError(
    typeof error === 'string'
      ? error
      : (cliLines(stderr).at(-1) ?? `mirrord ${args[0]} failed (exit code ${code})`),
  );
}
