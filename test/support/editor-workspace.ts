/**
 * What the editor tests open and check in a real VS Code (code-server): a workspace with a Node
 * HTTP app and its launch.json, the extension built by `npm run build`, and the session's end as
 * the extension and the CLI leave it.
 */
import { mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { packageRoot } from '../../src/package-root.js';
import { isAlive } from '../../src/platform/local/netns.js';
import type { Editor } from './code-server.js';
import { processesMatching } from './mirror-cli.js';
import { waitFor } from './wait.js';

export const VSIX = join(packageRoot(), 'extension', 'mirrord.vsix');

/** Screenshots of each step go here, next to the tests' compiled output (.test-out). */
const SCREENSHOTS = join(packageRoot(), '.test-out', 'screenshots');

/** The directory of one test's screenshots, emptied of an earlier run's. */
export function screenshotDir(name: string): string {
  const path = join(SCREENSHOTS, name);
  rmSync(path, { recursive: true, force: true });
  return path;
}

/** The app's handler line a breakpoint is set on (1-based), and what it prints. */
export const HANDLER_LINE = 4;

/** The debuggee: an HTTP server that says each request it handles, with the client's address. */
function serverSource(port: number): string {
  return [
    "const http = require('http');",
    'http',
    '  .createServer((request, response) => {',
    '    console.log(`handled ${request.method} ${request.url} from ${request.socket.remoteAddress}`);',
    "    response.end('handled locally\\n');",
    '  })',
    `  .listen(${port}, () => console.log('listening on ${port}'));`,
    '',
  ].join('\n');
}

/**
 * A workspace in `dir`: `server.js` listening on `port`, and a launch.json with one Node launch
 * configuration, as a user of the built-in JavaScript debugger has.
 */
export function nodeWorkspace(dir: string, port: number): string {
  const workspace = join(dir, 'workspace');
  mkdirSync(join(workspace, '.vscode'), { recursive: true });
  writeFileSync(join(workspace, 'server.js'), serverSource(port));
  const launch = {
    version: '0.2.0',
    configurations: [
      {
        type: 'node',
        request: 'launch',
        name: 'Launch server',
        program: '${workspaceFolder}/server.js',
        console: 'internalConsole',
      },
    ],
  };
  writeFileSync(join(workspace, '.vscode', 'launch.json'), JSON.stringify(launch, null, 2));
  return workspace;
}

/** `mirrord session` processes still running (the CLI the extension started). */
export function sessionProcesses(): string[] {
  return processesMatching('bin/run.js session');
}

/**
 * The layer channels' directories of live CLIs (`mirrord-layer-PID-…`, see layer-channel.ts): a
 * running session has one. A killed run's are not counted: the next session removes them.
 */
export function layerDirs(): string[] {
  return readdirSync(tmpdir()).filter((name) => {
    const owner = /^mirrord-layer-(\d+)-/.exec(name)?.[1];
    return owner !== undefined && isAlive(Number(owner));
  });
}

/**
 * Resolves once the session's `opened` event for a connection to `port` is in the extension's
 * output channel, sending `probe` (an empty connection to the target) before each look: the tap
 * copies the port only once the agent acknowledged the app's listen.
 */
export async function untilMirroringInEditor(
  editor: Editor,
  port: number,
  probe: () => Promise<unknown>,
): Promise<void> {
  const opened = new RegExp(`"event":"opened".*"server":\\{[^}]*"port":${port}\\}`);
  await waitFor(
    `a connection to ${port} to be mirrored (the output channel's opened event)`,
    async () => {
      await probe().catch(() => undefined);
      return opened.test(editor.outputChannelText('mirrord'));
    },
    { ms: 60_000, everyMs: 500 },
  ).catch((error: Error) => {
    const text = editor.outputChannelText('mirrord');
    throw new Error(`${error.message}; the channel ends with:\n${text.slice(-3000)}`);
  });
}
