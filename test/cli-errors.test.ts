/**
 * Errors, help and set-up, as a user meets them: the real CLI with bad input of every kind,
 * mirrord.json's errors, the checks made before anything is placed, and a build that redoes
 * nothing when nothing changed.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import MirrorCommand from '../src/commands/mirror.js';
import { CONFIG_KEYS, flagOf, loadMirrorConfig, type ConfigKey } from '../src/cli/config.js';
import { KUBE_ONLY_FLAGS, TARGET_FLAGS } from '../src/cli/mirror-settings.js';
import { packageRoot } from '../src/package-root.js';
import { CLI } from './support/mirror-cli.js';

const ROOT = packageRoot();
/** Never created: a local agent started for it fails with a line of its own. */
const NO_NETNS = 'mirrord-cli-errors-absent';

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

function cli(
  args: string[],
  options: { cwd?: string; asNobody?: boolean; path?: string } = {},
): Run {
  const command = [process.execPath, CLI, ...args];
  // nobody, with no capability left, as a user who forgot sudo; its HOME for oclif's data.
  const [file, ...argv] = options.asNobody
    ? ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', ...command]
    : command;
  const result = spawnSync(file!, argv, {
    encoding: 'utf8',
    cwd: options.cwd,
    env: {
      ...process.env,
      ...(options.asNobody ? { HOME: '/nonexistent' } : {}),
      ...(options.path === undefined ? {} : { PATH: options.path }),
    },
    timeout: 60_000,
  });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** oclif's own wording, which must never reach the user. */
const OCLIF_WORDING =
  /Parsing --|Expected an? |Nonexistent flag|›|See more help|The following errors? occurred|Missing required flag|command \S+ not found/;

/** The run printed exactly one line on stderr, `mirrord: …`, in mirrord's words. */
function expectOneLine(run: Run, line: RegExp): void {
  const lines = run.stderr.split('\n').filter(Boolean);
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^mirrord: /);
  expect(lines[0]).toMatch(line);
  expect(lines[0]).not.toMatch(OCLIF_WORDING);
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'mirrord-cli-errors-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('bad input: one line, exit code 2, for every command', () => {
  const cases: [string[], RegExp][] = [
    [['bogus'], /^mirrord: no command "bogus": see mirrord --help$/],
    [['mirro'], /^mirrord: no command "mirro" \(did you mean "mirror"\?\): see mirrord --help$/],
    [['demo', 'extra'], /^mirrord: demo takes no arguments, not "extra": see mirrord demo --help$/],
    [['mirror', '--pid', 'abc'], /^mirrord: --pid "abc" is not a whole number: see mirrord mirror/],
    [['mirror', '--pid', '0'], /^mirrord: --pid must be 1 or more, not 0/],
    [['mirror', '--pid'], /^mirrord: --pid needs a value/],
    [['mirror', '--prot', '80'], /^mirrord: mirror has no flag --prot: did you mean --port\?$/],
    [['mirror', '--bogus'], /^mirrord: mirror has no flag --bogus: see mirrord mirror --help$/],
    [['mirror', '--ignore-port', '70000'], /^mirrord: --ignore-port must be 65535 or less/],
    [['mirror', '--pod', 'Api_1'], /^mirrord: --pod "Api_1" is not a Kubernetes name/],
    [
      ['mirror', '-n', 'BAD', '--pod', 'api'],
      /^mirrord: --namespace "BAD" is not a Kubernetes name/,
    ],
    [['ls', '-n', 'BAD'], /^mirrord: --namespace "BAD" is not a Kubernetes name/],
    [['cleanup', '-n', 'BAD'], /^mirrord: --namespace "BAD" is not a Kubernetes name/],
    [['cleanup', '-n', 'x', '-A'], /^mirrord: give --namespace or --all-namespaces, not both/],
    [['ls', '--request-timeout', 'soon'], /^mirrord: --request-timeout "soon" is not a whole/],
    [
      ['mirror', '--pod', 'api', '--agent-pull-policy', 'Sometimes'],
      /^mirrord: --agent-pull-policy "Sometimes" is not one of Always, IfNotPresent, Never/,
    ],
    [['mirror', '--pid', '1', '--port', '80:99999'], /^mirrord: --port "80:99999" is not REMOTE/],
    [['mirror', '--pid', '1', '--pod', 'api'], /^mirrord: give one target, not --pid and --pod$/],
    [['mirror', '--', 'true'], /^mirrord: no target: give --pod/],
    [['mirror', '--netns', 'x', '--container', 'c'], /^mirrord: --container applies to Kubernetes/],
    [
      ['mirror', '--netns', 'x', 'node'],
      /^mirrord: unexpected argument "node": COMMAND .* after --/,
    ],
    [['mirror', '--netns', 'x'], /^mirrord: nothing to mirror into/],
    [['demo', '--duration', 'x'], /^mirrord: --duration "x" is not a whole number/],
    [['doctor', '--bogus'], /^mirrord: doctor has no flag --bogus/],
    [['agent'], /^mirrord: give one of --container-id, --netns, --pid/],
    [['agent', '--netns', 'x', '--idle-timeout', 'soon'], /^mirrord: --idle-timeout "soon" is not/],
    [['plugins', '--bogus'], /^mirrord: no such flag --bogus: see mirrord --help$/],
  ];
  test.each(cases)('mirrord %j', (args, line) => {
    const run = cli(args);
    expect({ status: run.status, stdout: run.stdout }).toEqual({ status: 2, stdout: '' });
    expectOneLine(run, line);
  });
});

describe('mirrord.json', () => {
  /** One bad value for each key, and what the line says: the type makes a new key need one. */
  const BAD: { [Key in ConfigKey]-?: [unknown, string] } = {
    pid: [-1, '"pid" must be a process id'],
    netns: ['', '"netns" must be a network namespace name'],
    pod: ['Api', '"pod" must be a Kubernetes name'],
    deployment: ['a b', '"deployment" must be a Kubernetes name'],
    statefulset: [1, '"statefulset" must be a Kubernetes name'],
    container: ['C', '"container" must be a Kubernetes name'],
    namespace: ['N', '"namespace" must be a Kubernetes name'],
    context: [3, '"context" must be a context name'],
    kubeconfig: [false, '"kubeconfig" must be a file path'],
    agentImage: [[], '"agentImage" must be an image reference'],
    agentPullPolicy: ['Sometimes', '"agentPullPolicy" must be Always, IfNotPresent or Never'],
    agentPullSecrets: [
      ['ok', 'Not_ok'],
      'agentPullSecrets[1] "Not_ok" is not the name of a secret',
    ],
    agentPrivileged: ['yes', '"agentPrivileged" must be true or false'],
    agentTtl: [-1, '"agentTtl" must be a number of seconds (0 or more)'],
    agentIdleTimeout: [0, '"agentIdleTimeout" must be a number of seconds (1 or more)'],
    agentStartupTimeout: [1.5, '"agentStartupTimeout" must be a number of seconds (1 or more)'],
    requestTimeout: ['20', '"requestTimeout" must be a number of seconds (1 or more)'],
    ports: [['80:8080', 'x'], 'ports[1] "x" is not REMOTE[:LOCAL] with ports from 1 to 65535'],
    ignorePorts: [[80, 0], 'ignorePorts[1] 0 is not a port from 1 to 65535'],
    midStream: [1, '"midStream" must be true or false'],
    env: ['no', '"env" must be true or false'],
    envIncludes: [['DB_*', ''], 'envIncludes[1] "" is not a glob of variable names'],
    envExcludes: ['SECRET_*', '"envExcludes" must be a list'],
    envOverrides: [['A=1', 'B'], 'envOverrides[1] "B" is not NAME=VALUE with a non-empty NAME'],
    fs: ['write', '"fs" must be read or local'],
    fsLocals: [[''], 'fsLocals[0] "" is not a glob of paths'],
    fsRemotes: ['/etc/*', '"fsRemotes" must be a list'],
    outgoing: ['off', '"outgoing" must be true or false'],
    outgoingLocals: [
      ['10.0.0.0/8', 'db:99999'],
      'outgoingLocals[1] "db:99999" is not CIDR or HOST, with :PORT for one port ([IPV6]:PORT)',
    ],
    localhost: ['mine', '"localhost" must be remote or local'],
  };

  test.each(CONFIG_KEYS)('a bad "%s" is named with the file', (key) => {
    const [value, said] = BAD[key];
    const file = join(dir, 'settings.json');
    writeFileSync(file, JSON.stringify({ [key]: value }));
    expect(() => loadMirrorConfig(file)).toThrow(`${file}: ${said}`);
  });

  test('from the CLI: the file as the user named it, the key, exit code 2', () => {
    const project = mkdtempSync(join(dir, 'project-'));
    writeFileSync(
      join(project, 'mirrord.json'),
      JSON.stringify({ netns: 'staging', ports: ['80', 'x'] }),
    );
    const found = cli(['mirror', '--', 'true'], { cwd: project });
    expect(found.status).toBe(2);
    expectOneLine(
      found,
      /^mirrord: mirrord\.json: ports\[1\] "x" is not REMOTE\[:LOCAL\] with ports from 1 to 65535$/,
    );

    writeFileSync(join(project, 'other.json'), JSON.stringify({ namespace: 'staging' }));
    const named = cli(['mirror', '--config', 'other.json', '--netns', 'x', '--', 'true'], {
      cwd: project,
    });
    expect(named.status).toBe(2);
    expectOneLine(
      named,
      /^mirrord: other\.json: "namespace" applies to Kubernetes targets \(pod, deployment, statefulset\), not to --pid or --netns$/,
    );

    const missing = cli(['mirror', '--config', 'absent.json', '--pod', 'api'], { cwd: project });
    expect(missing.status).toBe(2);
    expectOneLine(missing, /^mirrord: absent\.json: no such file \(from --config\)$/);
  });

  test('a key is its flag in camelCase, plural for a repeatable flag; Kubernetes-only alike', () => {
    const flags = MirrorCommand.flags as Record<string, { multiple?: boolean; helpGroup?: string }>;
    const keyOf = (flag: string): string =>
      flag.replace(/-(\w)/g, (_, letter: string) => letter.toUpperCase()) +
      (flags[flag]?.multiple ? 's' : '');
    const notSettings = ['json', 'config', 'dry-run'];
    const settingFlags = Object.keys(flags).filter((flag) => !notSettings.includes(flag));
    expect(settingFlags.map(keyOf).sort()).toEqual([...CONFIG_KEYS].sort());
    for (const key of CONFIG_KEYS) expect(keyOf(flagOf(key))).toBe(key);
    // What help groups under Kubernetes, the targets aside, is what a local target refuses.
    const targets: readonly string[] = TARGET_FLAGS;
    const kubeGrouped = Object.keys(flags).filter(
      (flag) => flags[flag]?.helpGroup?.includes('KUBERNETES') && !targets.includes(flag),
    );
    expect(kubeGrouped.sort()).toEqual([...KUBE_ONLY_FLAGS].sort());
  });
});

describe('help', () => {
  test('mirror shows where COMMAND goes; the top level lists plugins once', () => {
    const mirror = cli(['mirror', '--help']);
    expect(mirror.status).toBe(0);
    expect(mirror.stdout).toContain('$ mirrord mirror TARGET [FLAGS] -- COMMAND [ARGS…]');
    const top = cli(['--help']);
    expect(top.stdout.split('\n').filter((line) => /^\s+plugins\s/.test(line))).toHaveLength(1);
  });
});

// The target of these is a netns that does not exist: had an agent been placed for it, its
// failure ("network namespace … does not exist") would be the line. So each line below also
// says that nothing was placed: COMMAND, or the privileges, were refused first.
describe('checked before anything is placed', () => {
  /** A PATH directory whose `plain-file` and `a-directory` execvp could not run. */
  let binDir: string;
  beforeAll(() => {
    binDir = join(dir, 'bin');
    mkdirSync(join(binDir, 'a-directory'), { recursive: true });
    writeFileSync(join(binDir, 'plain-file'), '#!/bin/sh\necho not executable\n');
  });

  const cases: [string, string[], RegExp][] = [
    [
      'a missing name',
      ['no-such-command-xyz'],
      /^mirrord: command not found: no-such-command-xyz \(not in PATH\)/,
    ],
    [
      'a missing path',
      ['./no-such-program'],
      /^mirrord: COMMAND \.\/no-such-program does not exist/,
    ],
    ['a directory', ['/tmp'], /^mirrord: COMMAND \/tmp is a directory: give the program to run/],
    [
      'a file without x',
      ['/etc/passwd'],
      /^mirrord: COMMAND \/etc\/passwd is not executable: make it/,
    ],
  ];
  test.each(cases)('%s', (_, command, line) => {
    const run = cli(['mirror', '--netns', NO_NETNS, '--', ...command]);
    expect({ status: run.status, stdout: run.stdout }).toEqual({ status: 2, stdout: '' });
    expectOneLine(run, line);
  });

  test('found on PATH as execvp finds it: the first that can run, else why none can', () => {
    const path = `${binDir}:/usr/bin:/bin`;
    expect(cli(['mirror', '--netns', NO_NETNS, '--', 'plain-file'], { path }).stderr).toMatch(
      /^mirrord: COMMAND plain-file \(.*\/bin\/plain-file\) is not executable/,
    );
    expect(cli(['mirror', '--netns', NO_NETNS, '--', 'a-directory'], { path }).stderr).toMatch(
      /^mirrord: COMMAND a-directory \(.*\/bin\/a-directory\) is a directory/,
    );
    // `true` is found further on PATH: the agent is what fails now, so COMMAND passed.
    expect(cli(['mirror', '--netns', NO_NETNS, '--', 'true'], { path }).stderr).toMatch(
      /network namespace "mirrord-cli-errors-absent" does not exist/,
    );
  });

  test('without root: mirror and demo say the same line, exit 1, and start nothing', () => {
    const line =
      /^mirrord: mirroring a local target needs root \(this process lacks CAP_NET_ADMIN and CAP_SYS_ADMIN\): run it with sudo$/;
    const mirror = cli(['mirror', '--netns', NO_NETNS, '--', 'true'], { asNobody: true });
    expect({ status: mirror.status, stdout: mirror.stdout }).toEqual({ status: 1, stdout: '' });
    expectOneLine(mirror, line);
    const demo = cli(['demo'], { asNobody: true });
    // Not even "creating a sandbox", its first step: the demo made nothing.
    expect({ status: demo.status, stdout: demo.stdout }).toEqual({ status: 1, stdout: '' });
    expectOneLine(demo, line);
  });
});

test('mirror --json: a fatal error is a JSON event on stdout too, and one line on stderr', () => {
  const failed = cli(['mirror', '--json', '--netns', NO_NETNS, '--', 'true']);
  const message = `the agent exited before it was ready: network namespace "${NO_NETNS}" does not exist: see ip netns list`;
  expect(failed.status).toBe(1);
  expect(
    failed.stdout
      .split('\n')
      .filter(Boolean)
      .map((line) => JSON.parse(line)),
  ).toEqual([{ event: 'error', message }]);
  expect(failed.stderr).toBe(`mirrord: ${message}\n`);

  const usage = cli(['mirror', '--json', '--pid', 'abc']);
  expect(usage.status).toBe(2);
  expect(JSON.parse(usage.stdout)).toEqual({
    event: 'error',
    message: '--pid "abc" is not a whole number: see mirrord mirror --help',
  });
});

describe('npm run build', () => {
  /**
   * Every file the build makes, with its modification time. Not gyp's records in
   * build/Release/.deps: it rewrites the one of the BPF action (which runs make, a no-op then)
   * on every run.
   */
  function outputs(): Map<string, number> {
    const found = new Map<string, number>();
    const walk = (path: string): void => {
      const stats = statSync(path, { throwIfNoEntry: false });
      if (!stats || path.endsWith('/build/Release/.deps')) return;
      if (!stats.isDirectory()) {
        found.set(path, stats.mtimeMs);
        return;
      }
      for (const entry of readdirSync(path)) walk(join(path, entry));
    };
    for (const path of [
      'dist',
      'build/Release',
      'agent-bpf/.output',
      'layer/.output',
      'oclif.manifest.json',
      'tsconfig.tsbuildinfo',
    ]) {
      walk(join(ROOT, path));
    }
    return found;
  }

  const build = () =>
    spawnSync('npm', ['run', '--silent', 'build'], {
      cwd: ROOT,
      encoding: 'utf8',
      timeout: 240_000,
    });

  test('a second build compiles nothing and prints nothing', () => {
    // The first brings everything up to date (npm test's set-up has just built it all).
    expect(build().status).toBe(0);
    const before = outputs();
    expect(before.size).toBeGreaterThan(50);
    const again = build();
    expect({ status: again.status, output: again.stdout + again.stderr }).toEqual({
      status: 0,
      output: '',
    });
    const changed = [...outputs()].filter(([path, mtime]) => before.get(path) !== mtime);
    expect(changed.map(([path]) => path)).toEqual([]);
  }, 300_000);
});
