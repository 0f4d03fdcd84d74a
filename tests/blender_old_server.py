"""A server from before Finish now and batches, for the extension's tests: `serve --runner
blender_old_server:run_job`.

Loading this runner makes the server treat `finish` and `batch` as unknown message types (what an older
server answers them with); the jobs are the fake runner's.
"""

from __future__ import annotations

import blender_fake_runner

from server.wire import protocol

protocol.FINISH = "finish (unknown to this server)"
protocol.BATCH = "batch (unknown to this server)"
protocol.CLIENT_MESSAGES = protocol.CLIENT_MESSAGES - {"finish", "batch"}

run_job = blender_fake_runner.run_job
describe = blender_fake_runner.describe
