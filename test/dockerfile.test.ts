/**
 * The agent image, checked without a Docker engine: the Dockerfile is read and its runtime
 * stage rebuilt as a directory on this machine from the outputs of `npm run build`, holding only
 * what that stage copies (production node_modules pruned there by the stage's own prune), and
 * the Job's exact command is run from it against a real container process in a test netns.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, posix } from 'node:path';
import { createInterface } from 'node:readline';
import { agentJobManifest, AGENT_PORT } from '../src/platform/kube/agent-job.js';
import { netnsName } from '../src/platform/local/netns.js';
import { packageRoot } from '../src/package-root.js';
import { CGROUP_ROOT, removeCgroupTree } from './support/leftovers.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const ROOT = packageRoot();
const DOCKERFILE = join(ROOT, 'docker', 'agent.Dockerfile');
/** PATH of node:20-bookworm-slim (`docker inspect`), which the Dockerfile does not change. */
const IMAGE_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

interface Instruction {
  keyword: string;
  args: string[];
  /** The arguments as written, for RUN. */
  text: string;
}

interface Stage {
  name: string | undefined;
  instructions: Instruction[];
}

/** Splits a Dockerfile into stages of instructions (continuation lines joined, comments dropped). */
function parseDockerfile(text: string): Stage[] {
  const logical: string[] = [];
  let pending = '';
  for (const line of text.split('\n')) {
    if (/^\s*#/.test(line)) continue;
    if (line.endsWith('\\')) {
      pending += `${line.slice(0, -1)} `;
      continue;
    }
    const full = (pending + line).trim();
    pending = '';
    if (full) logical.push(full);
  }
  const stages: Stage[] = [];
  for (const line of logical) {
    const [keyword = '', ...rest] = line.split(/\s+/);
    const text = line.slice(keyword.length).trim();
    const instruction = { keyword: keyword.toUpperCase(), args: rest, text };
    if (instruction.keyword === 'FROM') {
      const as = rest.findIndex((word) => word.toUpperCase() === 'AS');
      stages.push({ name: as >= 0 ? rest[as + 1] : undefined, instructions: [] });
    }
    const stage = stages.at(-1);
    if (!stage) throw new Error(`instruction before FROM: ${line}`);
    stage.instructions.push(instruction);
  }
  return stages;
}

interface Copy {
  from: string | undefined;
  sources: string[];
  destination: string;
}

function copiesOf(stage: Stage): Copy[] {
  return stage.instructions
    .filter((instruction) => instruction.keyword === 'COPY')
    .map(({ args }) => {
      const from = args.find((arg) => arg.startsWith('--from='))?.slice('--from='.length);
      const paths = args.filter((arg) => !arg.startsWith('--'));
      return { from, sources: paths.slice(0, -1), destination: paths.at(-1) ?? '' };
    });
}

function workdirOf(stage: Stage): string {
  const workdir = stage.instructions.findLast((instruction) => instruction.keyword === 'WORKDIR');
  if (!workdir) throw new Error(`stage ${stage.name ?? '(last)'} has no WORKDIR`);
  return workdir.args[0] ?? '';
}

/**
 * Whether the root .dockerignore lets a path into the build context. Handles the forms that file
 * uses (`*`, `path/`, `!path/`, `!path`); any other pattern fails the test rather than being
 * judged wrongly.
 */
function inContext(path: string, patterns: string[]): boolean {
  let included = true;
  for (const raw of patterns) {
    const negated = raw.startsWith('!');
    const pattern = (negated ? raw.slice(1) : raw).replace(/\/$/, '');
    if (pattern !== '*' && /[*?[\]]/.test(pattern)) {
      throw new Error(`.dockerignore pattern this test cannot judge: ${raw}`);
    }
    const matches = pattern === '*' || path === pattern || path.startsWith(`${pattern}/`);
    if (matches) included = negated;
  }
  return included;
}

function dockerignorePatterns(): string[] {
  return readFileSync(join(ROOT, '.dockerignore'), 'utf8')
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line && !line.startsWith('#'));
}

const stages = parseDockerfile(readFileSync(DOCKERFILE, 'utf8'));
const build = stages.find((stage) => stage.name === 'build');
const runtime = stages.at(-1);

function buildStage(): Stage {
  if (!build) throw new Error('the Dockerfile has no stage "build"');
  return build;
}

function runtimeStage(): Stage {
  if (!runtime || runtime === build) throw new Error('the Dockerfile has no runtime stage');
  return runtime;
}

/** Where a file of the build stage's work directory is in this checkout. */
function fromBuildStage(source: string): string {
  const workdir = workdirOf(buildStage());
  if (!source.startsWith(`${workdir}/`)) {
    throw new Error(`${source} is outside the build stage's work directory ${workdir}`);
  }
  return join(ROOT, source.slice(workdir.length + 1));
}

/** The Job the CLI creates for an agent; only its container's command matters here. */
function jobCommand(containerId: string): string[] {
  const job = agentJobManifest({
    sessionId: 'dockerfile-test',
    namespace: 'default',
    node: 'node-1',
    containerId,
    target: 'pod/target',
    image: 'ghcr.io/mirrord-dev/mirrord-agent:0.1.0',
    pullSecrets: [],
    capabilities: false,
    ttlSeconds: 60,
    idleTimeoutSeconds: 30,
    cli: { host: 'test', pid: process.pid },
  });
  const command = job.spec?.template.spec?.containers[0]?.command;
  if (!command) throw new Error('the agent Job has no command');
  return command;
}

describe('the agent image (docker/agent.Dockerfile)', () => {
  test('the build stage copies only files that exist and that the build context holds', () => {
    const patterns = dockerignorePatterns();
    const sources = copiesOf(buildStage()).flatMap((copy) => copy.sources);
    expect(sources.length).toBeGreaterThan(0);
    for (const source of sources) {
      const path = source.replace(/\/$/, '');
      expect({ source, exists: existsSync(join(ROOT, path)) }).toEqual({ source, exists: true });
      expect({ source, inContext: inContext(path, patterns) }).toEqual({ source, inContext: true });
    }
    // The runtime stage's own files from the context too.
    for (const copy of copiesOf(runtimeStage()).filter((c) => c.from === undefined)) {
      for (const source of copy.sources) {
        expect(existsSync(join(ROOT, source))).toBe(true);
        expect(inContext(source, patterns)).toBe(true);
      }
    }
    // Build outputs never come from the host.
    for (const output of ['node_modules', 'dist', 'build', 'agent-bpf/.output']) {
      expect({ output, inContext: inContext(output, patterns) }).toEqual({
        output,
        inContext: false,
      });
    }
  });

  test('the runtime stage copies outputs that `npm run build` made', () => {
    const copies = copiesOf(runtimeStage()).filter((copy) => copy.from === 'build');
    const sources = copies.flatMap((copy) => copy.sources);
    expect(sources).toEqual(
      expect.arrayContaining([
        '/src/package.json',
        '/src/node_modules/',
        '/src/bin/',
        '/src/dist/',
        '/src/build/Release/mirrord_tap.node',
      ]),
    );
    for (const source of sources) {
      expect({ source, exists: existsSync(fromBuildStage(source)) }).toEqual({
        source,
        exists: true,
      });
    }
    // The build stage prunes what the runtime stage copies.
    const runs = buildStage()
      .instructions.filter((instruction) => instruction.keyword === 'RUN')
      .map((instruction) => instruction.text);
    expect(runs.some((run) => run.includes('npm prune --omit=dev'))).toBe(true);
  });

  test("the Job's command resolves to the image's mirrord on its PATH", () => {
    const [program] = jobCommand('containerd://0123456789ab');
    const installed = copiesOf(runtimeStage())
      .map((copy) => copy.destination)
      .filter((destination) => destination.startsWith('/'));
    const onPath = IMAGE_PATH.split(':').map((dir) => posix.join(dir, program ?? ''));
    expect(installed.filter((destination) => onPath.includes(destination))).toHaveLength(1);
    const entrypoint = runtimeStage().instructions.find((i) => i.keyword === 'ENTRYPOINT');
    expect(entrypoint?.text).toBe(`["${program}"]`);
  });

  describe('run from a directory holding only what the runtime stage copies', () => {
    let image: string;
    let sandbox: Sandbox;
    let cgroups: string;

    beforeAll(() => {
      image = mkdtempSync(join(tmpdir(), 'mirrord-image-'));
      const workdir = workdirOf(runtimeStage());
      // Paths of the image under `image`; relative destinations are below the WORKDIR.
      const inImage = (path: string): string =>
        join(image, path.startsWith('/') ? path : posix.join(workdir, path));
      for (const copy of copiesOf(runtimeStage())) {
        for (const source of copy.sources) {
          const from =
            copy.from === 'build' ? fromBuildStage(source) : join(ROOT, source.replace(/\/$/, ''));
          const intoDirectory = copy.destination.endsWith('/') || copy.sources.length > 1;
          const to = statSync(from).isDirectory()
            ? inImage(copy.destination)
            : intoDirectory
              ? join(inImage(copy.destination), basename(from))
              : inImage(copy.destination);
          mkdirSync(dirname(to), { recursive: true });
          cpSync(from, to, { recursive: true, verbatimSymlinks: true, preserveTimestamps: true });
        }
      }
      // The build stage's prune, done here on a copy of the checkout's node_modules: it needs
      // the lock file, which the runtime stage does not copy.
      const app = inImage('.');
      cpSync(join(ROOT, 'package-lock.json'), join(app, 'package-lock.json'));
      execFileSync(
        'npm',
        ['prune', '--omit=dev', '--ignore-scripts', '--offline', '--no-audit', '--no-fund'],
        { cwd: app, stdio: 'ignore' },
      );
      rmSync(join(app, 'package-lock.json'));
      // The wrapper names the image's WORKDIR; here that directory is below `image`.
      for (const copy of copiesOf(runtimeStage()).filter((c) => c.destination.startsWith('/'))) {
        const wrapper = inImage(copy.destination);
        writeFileSync(wrapper, readFileSync(wrapper, 'utf8').replaceAll(workdir, app));
        chmodSync(wrapper, statSync(join(ROOT, copy.sources[0] ?? '')).mode);
      }
      sandbox = createSandbox('image');
      cgroups = join(CGROUP_ROOT, netnsName('mirrord-test', 'image'));
    });

    afterAll(async () => {
      sandbox?.destroy();
      rmSync(image, { recursive: true, force: true });
      for (let attempt = 0; attempt < 50 && existsSync(cgroups); attempt += 1) {
        try {
          removeCgroupTree(cgroups);
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      }
    });

    test('holds no dev dependency, no BPF object file and no sources', () => {
      const app = join(image, workdirOf(runtimeStage()));
      expect(existsSync(join(app, 'node_modules', 'msgpackr'))).toBe(true);
      expect(existsSync(join(app, 'node_modules', 'typescript'))).toBe(false);
      expect(existsSync(join(app, 'node_modules', 'jest'))).toBe(false);
      expect(existsSync(join(app, 'agent-bpf'))).toBe(false);
      expect(existsSync(join(app, 'src'))).toBe(false);
    });

    test("the Job's command starts the agent, which taps the container and serves a session", async () => {
      // A "container": a process of the sandbox's target netns in a cgroup named as containerd
      // names them.
      const id = randomBytes(32).toString('hex');
      const cgroup = join(cgroups, 'kubepods.slice', `cri-containerd-${id}.scope`);
      mkdirSync(cgroup, { recursive: true });
      const container = sandbox.spawn(sandbox.target, 'sleep', ['120']);
      writeFileSync(join(cgroup, 'cgroup.procs'), String(container.pid));

      // The agent runs in a netns of its own, as in its pod: the client side of the sandbox.
      const [program = '', ...args] = jobCommand(`containerd://${id}`);
      const PATH = [join(image, 'usr/local/bin'), dirname(process.execPath), IMAGE_PATH].join(':');
      // The container's environment: its PATH and nothing of jest's (NODE_ENV=test would put
      // oclif in development mode).
      const agent = sandbox.spawn(sandbox.client, program, args, { env: { PATH } });
      const stderr: string[] = [];
      agent.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk.toString()));
      const exited = new Promise<number | null>((resolve) => agent.once('exit', resolve));

      const readiness = await new Promise<Record<string, unknown>>((resolve, reject) => {
        createInterface({ input: agent.stdout! }).on('line', (line) => {
          if (line.startsWith('{')) resolve(JSON.parse(line) as Record<string, unknown>);
        });
        void exited.then((code) =>
          reject(new Error(`the agent exited (${code}) before it was ready: ${stderr.join('')}`)),
        );
      });
      expect(readiness).toMatchObject({
        ready: true,
        address: '127.0.0.1',
        port: AGENT_PORT,
        target: `container containerd://${id}`,
      });
      expect(readiness.interfaces).toEqual(expect.arrayContaining(['lo', 'eth0']));

      // A session through the image's own protocol client, from the agent's netns; the agent
      // serves one session and exits when it ends.
      const client = sandbox.spawn(sandbox.client, process.execPath, [
        '--input-type=module',
        '-e',
        `const { connectToAgent } = await import(${JSON.stringify(
          join(image, workdirOf(runtimeStage()), 'dist/protocol/client.js'),
        )});
         const client = await connectToAgent('127.0.0.1', ${AGENT_PORT});
         console.log(client.agent.target);
         await client.close();`,
      ]);
      const target = new Promise<string>((resolve) => {
        let out = '';
        client.stdout?.on('data', (chunk: Buffer) => (out += chunk.toString()));
        client.once('exit', () => resolve(out.trim()));
      });
      expect(await target).toBe(`container containerd://${id}`);
      expect(await exited).toBe(0);
    });
  });
});
