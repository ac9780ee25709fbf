# local-process: a workspace is a home directory and processes on the
# provisioner's machine. The home directory persists across stop and start;
# the agent runs while the workspace is started.
#
#   devmesh templates push local-process -d examples/templates/local-process
#   devmesh create dev --template local-process

terraform {
  required_providers {
    devmesh = { source = "devmesh/devmesh" }
  }
}

data "devmesh_workspace" "me" {}
data "devmesh_workspace_owner" "me" {}

data "devmesh_parameter" "home_root" {
  name        = "home_root"
  description = "Where workspaces' home directories live on the provisioner's machine."
  default     = "/tmp/devmesh-workspaces"
}

locals {
  home = "${data.devmesh_parameter.home_root.value}/${data.devmesh_workspace_owner.me.name}/${data.devmesh_workspace.me.name}"
}

resource "devmesh_agent" "main" {
  os             = "linux"
  arch           = "amd64"
  dir            = local.home
  startup_script = <<-EOT
    echo "started at $(date)" >> "${local.home}/starts.log"
  EOT
}

# Persistent: the home directory, kept until the workspace is deleted.
resource "terraform_data" "home" {
  input = local.home
  provisioner "local-exec" {
    command = "mkdir -p '${self.input}'"
  }
  provisioner "local-exec" {
    when    = destroy
    command = "rm -rf '${self.input}'"
  }
}

# Ephemeral: the agent process, running only while the workspace is started
# (and restarted each build, which gives the agent a new token).
resource "terraform_data" "agent" {
  count            = data.devmesh_workspace.me.start_count
  depends_on       = [terraform_data.home]
  triggers_replace = devmesh_agent.main.token
  input            = local.home
  provisioner "local-exec" {
    command = <<-EOT
      printf '%s' "$INIT_SCRIPT" > '${local.home}/.devmesh-init.sh'
      DEVMESH_AGENT_DIR='${local.home}/.devmesh' nohup sh '${local.home}/.devmesh-init.sh' \
        > '${local.home}/.devmesh-agent.log' 2>&1 < /dev/null &
      echo $! > '${local.home}/.devmesh-agent.pid'
    EOT
    environment = {
      INIT_SCRIPT         = devmesh_agent.main.init_script
      DEVMESH_AGENT_TOKEN = devmesh_agent.main.token
    }
  }
  provisioner "local-exec" {
    when    = destroy
    command = <<-EOT
      pid=$(cat '${self.input}/.devmesh-agent.pid' 2>/dev/null) || exit 0
      kill "$pid" 2>/dev/null || exit 0
      for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    EOT
  }
}

data "devmesh_parameter" "web_port" {
  name           = "web_port"
  type           = "number"
  description    = "The local port of the workspace's web app."
  default        = "8000"
  validation_min = 1
  validation_max = 65535
}

# The workspace's web app: whatever listens on web_port in it.
resource "devmesh_app" "web" {
  agent_id = devmesh_agent.main.id
  slug     = "web"
  port     = data.devmesh_parameter.web_port.value
}
