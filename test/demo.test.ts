/**
 * `mirrord demo`, as a user runs it: the real CLI, its sandbox staging, its agent, the example
 * app under mirrord, and its cleanup.
 */
import { spawn } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { deleteNetns, listNetns } from '../src/platform/local/netns.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'run.js');
const CLIENT = '10.213.100.2';

/** What a process is running, or undefined once it is gone (a zombie has no command line). */
function commandLine(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** Every process below `root`, by pid, with its command line. */
function descendants(root: number): Map<number, string> {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      // The parent pid is the second field after the command name, which may hold spaces.
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch {
      // Gone meanwhile.
    }
  }
  const found = new Map<number, string>();
  const queue = [root];
  for (let pid = queue.pop(); pid !== undefined; pid = queue.pop()) {
    for (const child of children.get(pid) ?? []) {
      const command = commandLine(child);
      if (command) found.set(child, command);
      queue.push(child);
    }
  }
  return found;
}

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

/** Runs `mirrord demo ARGS`; `interruptWhen` sends SIGINT once the output matches it. */
function runDemo(args: string[], interruptWhen?: RegExp): Promise<DemoRun> {
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
      for (const [p, command] of processes)
        if (commandLine(p) === command) process.kill(p, 'SIGKILL');
      for (const name of ownNetns()) deleteNetns(name);
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 90_000);
    let out = '';
    const collect = (chunk: Buffer): void => {
      out += chunk.toString();
      if (interruptWhen?.test(out)) {
        interruptWhen = undefined;
        child.kill('SIGINT');
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

/** Resolves once none of `processes` runs any more; returns those still running at `ms`. */
async function stillRunning(processes: Map<number, string>, ms = 10_000): Promise<string[]> {
  const deadline = Date.now() + ms;
  for (;;) {
    const left = [...processes].filter(([pid, command]) => commandLine(pid) === command);
    if (left.length === 0 || Date.now() > deadline) return left.map(([, command]) => command);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
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

  test('Ctrl-C once requests arrive ends it and removes everything', async () => {
    const run = await runDemo(['--duration', '0'], /^local app: (GET|POST) /m);
    expect(`exit ${run.code}\n${run.out}`).toMatch(/^exit 0\n[^]*removed the sandbox/);
    await expectNothingLeft(run);
  });
});
