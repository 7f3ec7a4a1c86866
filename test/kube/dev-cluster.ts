/**
 * `npm run dev:cluster`: a stand-in cluster to try the CLI against by hand. Starts it with a
 * sample Deployment (a small Node HTTP service), prints the KUBECONFIG to export and a curl
 * command that sends the service traffic, and removes everything on Ctrl-C. Needs root (it
 * makes network namespaces and cgroups) and a build (`npm run build`: the agent Jobs run
 * `bin/run.js`).
 */
import { startStandInCluster } from './cluster.js';

const PORT = 8080;
/** Answers every request with a line describing it, so traffic is easy to recognise. */
const SERVICE = `require('http').createServer((req, res) => {
  let body = 0;
  req.on('data', (chunk) => (body += chunk.length));
  req.on('end', () => res.end(req.method + ' ' + req.url + ' (' + body + ' bytes) served by deployment/api\\n'));
}).listen(${PORT})`;

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) {
    console.error('dev:cluster: run as root (it makes network namespaces and cgroups)');
    process.exitCode = 1;
    return;
  }
  const cluster = await startStandInCluster();
  let closing: Promise<void> | undefined;
  const close = (): void => {
    closing ??= cluster.close().then(
      () => process.exit(0),
      (error: unknown) => {
        console.error(`dev:cluster: cleanup failed: ${(error as Error).message}`);
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', close);
  process.on('SIGTERM', close);
  try {
    const api = await cluster.addDeployment({
      name: 'api',
      containers: [
        {
          name: 'api',
          image: 'stand-in/local',
          command: [process.execPath, '-e', SERVICE],
          ports: [{ containerPort: PORT, name: 'http' }],
        },
      ],
    });
    const pod = api.pods[0];
    console.log(`stand-in cluster at ${cluster.url} (node ${cluster.nodeName})

  export KUBECONFIG=${cluster.kubeconfigPath}

deployment/api: pod ${pod?.name} at ${pod?.ip}:${PORT}
  mirror it:     node bin/run.js mirror --deployment api -- <your local command>
  send traffic:  sudo ip netns exec ${cluster.clientNetns} curl -s --data hello http://${pod?.ip}:${PORT}/

Ctrl-C stops the cluster and removes its namespaces, cgroups and processes.`);
  } catch (error) {
    console.error(`dev:cluster: ${(error as Error).message}`);
    close();
  }
}

await main();
