/**
 * `mirrord demo`, as a user runs it: the real CLI, its sandbox staging, its agent, the example
 * app under mirrord, and its cleanup.
 */
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { deleteNetns, listNetns } from '../src/platform/local/netns.js';
import { descendants, killAll, stillRunning } from './support/processes.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'run.js');
const CLIENT = '10.213.100.2';

interface DemoRun {
  code: number | null;
  out: string;
  /** Every process the demo started (agent, app, service, traffic), seen while it ran. */
  processes: Map<number, string>;
  /** Its namespaces, seen while it ran. */
  netns: Set<string>;
  /** Its namespaces still there once it exited. */
  netnsLeft: string[];
}

/** What a failed test would leave behind, removed after each test. */
const leftovers: (() => void)[] = [];
afterEach(() => {
  for (const remove of leftovers.splice(0)) remove();
});

/** Runs `mirrord demo ARGS`; `interruptWhen` sends `signal` once the output matches it. */
function runDemo(
  args: string[],
  interruptWhen?: RegExp,
  signal: NodeJS.Signals = 'SIGINT',
): Promise<DemoRun> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, 'demo', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const pid = child.pid!;
    const ownNetns = (): string[] => listNetns(`mirrord-demo-staging-${pid}-`);
    const processes = new Map<number, string>();
    const netns = new Set<string>();
    const watch = setInterval(() => {
      for (const [p, command] of descendants(pid)) processes.set(p, command);
      for (const name of ownNetns()) netns.add(name);
    }, 100);
    leftovers.push(() => {
      killAll(processes);
      for (const name of ownNetns()) deleteNetns(name);
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 90_000);
    let out = '';
    const collect = (chunk: Buffer): void => {
      out += chunk.toString();
      if (interruptWhen?.test(out)) {
        interruptWhen = undefined;
        child.kill(signal);
      }
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    child.on('exit', (code) => {
      clearInterval(watch);
      clearTimeout(timer);
      resolve({ code, out, processes, netns, netnsLeft: ownNetns() });
    });
  });
}

/** The requests in lines `WHO: METHOD PATH [BODY] from ADDRESS:PORT -> STATUS`, by who. */
function requests(out: string, who: 'staging' | 'local app'): string[] {
  const line = /^(staging|local app): +(\S+) (\S+)(?: (\{.*\}))? from (\S+) -> \d+$/gm;
  return [...out.matchAll(line)]
    .filter((match) => match[1] === who)
    .map(([, , method, path, body = '', from]) => `${method} ${path} ${body} from ${from}`);
}

/** The demo ran its pieces (so that "none left" means something) and left none of them. */
async function expectNothingLeft(run: DemoRun): Promise<void> {
  const commands = [...run.processes.values()];
  expect(commands.some((c) => / agent --netns mirrord-demo-staging-/.test(c))).toBe(true);
  expect(commands.some((c) => c.includes('examples/orders-app/server.js'))).toBe(true);
  expect(run.netns.size).toBeGreaterThan(0);
  expect(run.netnsLeft).toEqual([]);
  expect(await stillRunning(run.processes)).toEqual([]);
}

describe('mirrord demo', () => {
  test('replays what staging answered into the example app, then removes everything', async () => {
    const run = await runDemo(['--duration', '6']);
    // With the whole output, should it fail.
    expect(`exit ${run.code}\n${run.out}`).toMatch(/^exit 0\n/);
    const answered = requests(run.out, 'staging');
    const replayed = requests(run.out, 'local app');
    expect(replayed.length).toBeGreaterThanOrEqual(3);
    for (const request of replayed) expect(request).toMatch(new RegExp(` from ${CLIENT}:\\d+$`));
    // The same requests, each with the client's own port: what staging answered, the app got.
    expect([...replayed].sort()).toEqual([...answered].sort());
    expect(run.out).toContain(`local app: handled ${replayed.length} requests`);
    expect(run.out).toContain(`staging answered ${answered.length} requests`);
    await expectNothingLeft(run);
  });

  test('Ctrl-C once requests arrive ends it, removes everything and exits 130', async () => {
    const run = await runDemo(['--duration', '0'], /^local app: (GET|POST) /m);
    expect(`exit ${run.code}\n${run.out}`).toMatch(/^exit 130\n[^]*removed the sandbox/);
    await expectNothingLeft(run);
  });

  test('kill -9 once requests arrive: its app, service, users and agent end with it', async () => {
    const run = await runDemo(['--duration', '0'], /^local app: (GET|POST) /m, 'SIGKILL');
    expect(run.code).toBeNull();
    const commands = [...run.processes.values()];
    for (const piece of ['examples/orders-app/server.js', 'demo/service.js', 'demo/traffic.js']) {
      expect({ piece, seen: commands.some((c) => c.includes(piece)) }).toEqual({
        piece,
        seen: true,
      });
    }
    expect(commands.some((c) => / agent --netns mirrord-demo-staging-/.test(c))).toBe(true);
    expect(await stillRunning(run.processes)).toEqual([]);
    // Its namespaces are left: the next demo removes those of a killed one (here, afterEach).
  });
});
