/**
 * A real pod's context in the local app, on the real test cluster: its environment (what it
 * got from a ConfigMap and a Secret through envFrom, the downward API, its spec and the
 * namespace's Services) and its files (a Secret volume, a ConfigMap volume, a file it wrote
 * in an emptyDir), read by the agent from the container's process.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { testCluster, type TestCluster } from './support/kube.js';
import { CLI, mirrord, tempDir, untilAsync } from './support/mirror-cli.js';

const NAMESPACE = 'kube-context';
/** What the pod writes in its emptyDir: byte i is i % 251. */
const BIG_BYTES = 100 * 1024 * 1024;
const run = promisify(execFile);

describe("a pod's environment and files (real cluster)", () => {
  let cluster: TestCluster;
  let serviceIp: string;
  const dir = tempDir('kube-context');

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    await cluster.core.createNamespacedConfigMap({
      namespace: NAMESPACE,
      body: { metadata: { name: 'api-config' }, data: { LOG_LEVEL: 'debug', REGION: 'eu-1' } },
    });
    await cluster.core.createNamespacedSecret({
      namespace: NAMESPACE,
      body: { metadata: { name: 'api-secret' }, stringData: { DB_PASSWORD: "p@ss'w=rd\n" } },
    });
    await cluster.core.createNamespacedConfigMap({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'api-files' },
        data: { 'app.yaml': 'replicas: 3\nregion: eu-1\n' },
      },
    });
    // Made before the pod, so that the kubelet gives the pod its variables.
    const service = await cluster.core.createNamespacedService({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'db' },
        spec: { selector: { app: 'db' }, ports: [{ port: 5432, name: 'pg' }] },
      },
    });
    serviceIp = service.spec!.clusterIP!;
    await cluster.core.createNamespacedPod({
      namespace: NAMESPACE,
      body: {
        metadata: { name: 'api', labels: { app: 'api' } },
        spec: {
          terminationGracePeriodSeconds: 1,
          containers: [
            {
              name: 'api',
              image: 'mirrord.test/node:20',
              imagePullPolicy: 'Never',
              command: [
                'node',
                '-e',
                `require('fs').writeFileSync('/data/big.bin', Buffer.alloc(${BIG_BYTES}).map((_, i) => i % 251));
                 require('net').createServer((s) => s.resume()).listen(8080)`,
              ],
              volumeMounts: [
                { name: 'secret', mountPath: '/etc/secret', readOnly: true },
                { name: 'config', mountPath: '/etc/config', readOnly: true },
                { name: 'data', mountPath: '/data' },
              ],
              readinessProbe: { tcpSocket: { port: 8080 }, periodSeconds: 1 },
              envFrom: [
                { configMapRef: { name: 'api-config' } },
                { secretRef: { name: 'api-secret' } },
              ],
              env: [
                { name: 'POD_NAME', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } },
                { name: 'MODE', value: 'staging' },
              ],
            },
          ],
          volumes: [
            { name: 'secret', secret: { secretName: 'api-secret' } },
            { name: 'config', configMap: { name: 'api-files' } },
            { name: 'data', emptyDir: {} },
          ],
        },
      },
    });
    await cluster.readyPods('api', 1);
  }, 300_000);

  afterAll(async () => {
    dir.remove();
    await cluster?.remove();
  }, 300_000);

  const kube = (...args: string[]) => [
    ...args,
    '-n',
    NAMESPACE,
    '--kubeconfig',
    cluster.kubeconfig,
  ];
  /** The agent's Job, Secret and pod go once the command is done (the pod after its grace). */
  const nothingLeft = () =>
    untilAsync(
      async () => (await cluster.mirrordObjects()).length === 0,
      'no mirrord Job, Secret or pod left',
    );
  const expected = () => ({
    LOG_LEVEL: 'debug',
    REGION: 'eu-1',
    DB_PASSWORD: "p@ss'w=rd\n",
    POD_NAME: 'api',
    MODE: 'staging',
    DB_SERVICE_HOST: serviceIp,
    DB_SERVICE_PORT_PG: '5432',
  });

  test('mirrord env prints the pod’s variables over the local ones', async () => {
    const { stdout } = await run(process.execPath, [CLI, ...kube('env', '--pod', 'api', '--json')]);
    const env = JSON.parse(stdout) as Record<string, string>;
    expect(env).toMatchObject(expected());
    expect(env.KUBERNETES_SERVICE_HOST).toMatch(/^10\.213\./);
    expect(env.PATH).toBe(process.env.PATH);
    expect(env.HOSTNAME).not.toBe('api');
    await nothingLeft();
  }, 180_000);

  test('the app mirrored from the pod starts with them', async () => {
    const file = join(dir.path, 'app-env');
    const session = mirrord([
      ...kube('--pod', 'api'),
      '--',
      process.execPath,
      '-e',
      `require('fs').writeFileSync(${JSON.stringify(file)}, JSON.stringify(process.env))`,
    ]);
    expect({ code: await session.exited, output: session.output() }).toEqual({
      code: 0,
      output: expect.stringMatching(/the app gets \d+ variables from pod kube-context\/api/),
    });
    const env = JSON.parse(readFileSync(file, 'utf8')) as Record<string, string>;
    expect(env).toMatchObject(expected());
    expect(env.HOME).toBe(process.env.HOME);
    await nothingLeft();
  }, 180_000);

  test('the app mirrored from the pod reads its Secret and ConfigMap volumes and its files', async () => {
    const file = join(dir.path, 'app-files');
    const program = `
      const fs = require('fs');
      const out = {
        password: fs.readFileSync('/etc/secret/DB_PASSWORD', 'utf8'),
        yaml: fs.readFileSync('/etc/config/app.yaml', 'utf8'),
        config: fs.readdirSync('/etc/config').filter((name) => !name.startsWith('..')),
        size: fs.statSync('/data/big.bin').size,
        sha: require('crypto').createHash('sha256').update(fs.readFileSync('/data/big.bin')).digest('hex'),
        missing: fs.existsSync('/etc/secret/nothing'),
        missingCode: (() => { try { fs.readFileSync('/etc/secret/nothing'); } catch (e) { return e.code; } })(),
        // The kubelet's layout of a Secret volume: each key a link into ..data, 0644 by default.
        secretLink: fs.readlinkSync('/etc/secret/DB_PASSWORD'),
        secretMode: fs.statSync('/etc/secret/DB_PASSWORD').mode & 0o777,
      };
      fs.writeFileSync(${JSON.stringify(file)}, JSON.stringify(out));`;
    const session = mirrord([...kube('--pod', 'api'), '--', process.execPath, '-e', program]);
    expect({ code: await session.exited, output: session.output() }).toMatchObject({ code: 0 });
    const expectedSha = createHash('sha256')
      .update(Buffer.alloc(BIG_BYTES).map((_, i) => i % 251))
      .digest('hex');
    expect(JSON.parse(readFileSync(file, 'utf8'))).toEqual({
      password: "p@ss'w=rd\n",
      yaml: 'replicas: 3\nregion: eu-1\n',
      config: ['app.yaml'],
      size: BIG_BYTES,
      sha: expectedSha,
      missing: false,
      missingCode: 'ENOENT',
      secretLink: '..data/DB_PASSWORD',
      secretMode: 0o644,
    });
    // find (C, libc) walks the ConfigMap volume through its stand-ins, following the kubelet's
    // links (-L), and sizes the file there.
    const yaml = 'replicas: 3\nregion: eu-1\n';
    const found = mirrord([
      ...kube('--pod', 'api'),
      '--',
      'find',
      '-L',
      '/etc/config/',
      '-name',
      'app.yaml',
      '-size',
      `${Buffer.byteLength(yaml)}c`,
    ]);
    expect({ code: await found.exited, output: found.output() }).toMatchObject({ code: 0 });
    expect(found.stdout().trim().split('\n')).toContain('/etc/config/app.yaml');
    await nothingLeft();
  }, 180_000);
});
