# make run        the four services under honcho (Procfile), from .venv
# make run-scale  the scaled-out setup under honcho (Procfile.scale): redis, nginx, 2 gateways, 2 agents
# make test       what CI runs (.ci/run): the test command of README.md, `python -m pytest -q`
#
# Works on a brand-new Debian 12 machine that has only python3 and git, as root or as a user
# with sudo. Installed with apt-get only when missing (deploy/apt-install.sh): python3-venv
# (when `python3 -m venv` fails: Debian ships ensurepip apart), redis-server and nginx-light
# (test, run-scale). On a machine booted with systemd, Debian's packages also start both as
# services (nginx on :80, redis on 127.0.0.1:6379): nothing here needs or disturbs them, since
# the tests use free ports and Procfile.scale :8000-8004, :8010-8011 and :8020-8021.
# (`systemctl disable --now nginx redis-server` stops them for good, if they are not wanted.)

VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: run run-scale test system-packages

run: $(VENV)/.requirements
	$(VENV)/bin/honcho start

run-scale: system-packages $(VENV)/.requirements
	$(VENV)/bin/honcho -f Procfile.scale start

test: system-packages $(VENV)/.requirements-dev
	$(PYTHON) -m pytest -q

# redis-server and nginx, for the scaled-out tests and Procfile.scale. Debian puts nginx in
# /usr/sbin, off a normal user's PATH: tests/nginx_server.py and deploy/nginx.sh look there too.
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	if [ -n "$$missing" ]; then sh deploy/apt-install.sh $$missing; fi

# The virtualenv; bin/pip marks a finished one (a failed `venv` leaves bin/python without it).
$(VENV)/bin/pip:
	python3 -m venv --clear $(VENV) || { sh deploy/apt-install.sh python3-venv && python3 -m venv --clear $(VENV); }
	$(PYTHON) -m pip install -q --upgrade pip

# Requirements, installed again whenever a requirements file changes.
$(VENV)/.requirements: requirements.txt | $(VENV)/bin/pip
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.requirements-dev: requirements.txt requirements-dev.txt | $(VENV)/bin/pip
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@
