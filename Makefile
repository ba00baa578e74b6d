# sjd2 — `make help` lists the targets. Every target sets up .venv itself on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Why this pin: see README "Why torch 2.13.0". Override e.g. TORCH=torch==2.14.1 for CUDA machines.
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
MODEL ?= tiny
# short names of the real models -> their conf/model/*.yaml (paper settings); janus_pro_1b / janus_pro_7b are their own
MODEL_CONF = $(patsubst emu3,emu3_720,$(patsubst lumina_mgpt,lumina_mgpt_768,$(MODEL)))
NPROC ?= $(if $(findstring tiny,$(MODEL)),2,8)
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow test-full lint bench decoders real-size tiny-model tiny-sjd2 finetune sweep eval-coco eval-geneval \
	geneval-prompts clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(DEEPSPEED)"
	$(PIP) install -q -e ".[train,test,launch]"
	touch $@

install: $(VENV)/.installed ## create .venv: torch first, then the project with train+test extras

demo: install ## decode shapes prompts with every decoder on tiny, print the comparison table
	$(PY) -m bench.demo

test: install ## the fast test suite (under 15 minutes on 2 CPU cores)
	$(PY) -m pytest -x -p no:cacheprovider

test-slow: install ## only the slow tests (2-process DeepSpeed ZeRO-3, the 8193-step Emu3 decode); CI runs them too
	$(PY) -m pytest -p no:cacheprovider -m slow

test-full: install ## every test, slow ones included
	$(PY) -m pytest -p no:cacheprovider -m "slow or not slow"

lint: install ## ruff over the code
	$(PIP) install -q ruff && $(VENV)/bin/ruff check .

bench: install ## AR vs SJD vs SJD2 side by side on tiny: step compression, latency ratio, loop overhead; throughput at B=1,4,16
	$(PY) -m bench.decoders

real-size: install ## random-weight Lumina-mGPT-7B + Emu3-Gen in the published layouts: write, measure, decode on CPU (needs ~17 GB free RAM, 31 GB disk in $$SJD2_SCRATCH)
	$(PY) -m bench.real_size write && $(PY) -m bench.real_size measure && $(PY) -m bench.real_size decode

decoders: install ## every decoder of the family (ar sjd scd sjd_pac gsd sjd2 +coupling) on tiny / tiny_sjd2, one protocol: table + plot [DECODER_ROWS=.. FULL=..]
	OMP_NUM_THREADS=1 $(PY) -m bench.decoder_table $(if $(DECODER_ROWS),--rows $(DECODER_ROWS)) $(if $(FULL),--full $(FULL)) $(ARGS)

tiny-model: install ## rebuild models/weights/tiny: shapes VQ + three training phases (about 70 min on 2 CPU cores)
	$(PY) -m train.tiny_recipe --steps 1100 --eval-prompts 0
	$(PY) -m train.tiny_recipe --init-from models/weights/tiny --seed 1 --steps 1000 --lr 1e-3 --warmup-steps 30 \
		--eval-prompts 0
	$(PY) -m train.tiny_recipe --init-from models/weights/tiny --seed 2 --steps 400 --lr 5e-4 --warmup-steps 20 \
		--colour-share 0.5 --train-examples 20000 --threads 2

tiny-sjd2: install ## rebuild models/weights/tiny_sjd2: SJD2 fine-tuning of tiny (one process, CPU)
	$(PY) -m train model=tiny train=sjd2_tiny resume=false run_dir=runs/train/tiny-sjd2_tiny-$$(date +%s) \
		train.export_dir=models/weights/tiny_sjd2

finetune: install ## SJD2 fine-tuning, DeepSpeed ZeRO-3: make finetune MODEL=tiny|lumina_mgpt|emu3|janus_pro_1b [NPROC=..] [ARGS="..."] [DRY_RUN=1: the plan only]
	DRY_RUN=$(DRY_RUN) launch/finetune.sh $(MODEL_CONF) $(NPROC) $(ARGS)

sweep: install ## SJD2 window x steps sweep on tiny_sjd2 (Hydra multirun), then its table and plot
	$(PY) -m decode -m model=tiny_sjd2 decoder=sjd2 decoder.window=16,32,64 decoder.denoise_steps=5,10,25 \
		prompts.limit=24 seed=0
	$(PY) -m eval 'run_dirs=[runs/tiny_sjd2/shapes/sjd2_*_s0]' table_dir=runs/sweep name=sjd2_sweep

# eval-coco / eval-geneval: the shapes world on tiny by default; the real sets for real models. Counts (LIMIT, NPROC)
# and every path (COCO, SJD2_PATH, GenEval's prompts, the eval suite's files) are checked before anything decodes;
# on tiny, SJD2_PATH replaces the committed tiny_sjd2 in its rows.
COCO_SET ?= $(if $(findstring tiny,$(MODEL)),shapes_coco,coco2017_5k)
GENEVAL_SET ?= $(if $(findstring tiny,$(MODEL)),shapes_geneval,geneval)
SUITE_ARGS = --model $(MODEL) --nproc $(NPROC) $(if $(COCO),--coco $(COCO)) $(if $(SJD2_PATH),--sjd2-path $(SJD2_PATH)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(DECODERS),--decoders $(DECODERS)) $(ARGS)

eval-coco: install ## AR/SJD/SJD2 on COCO prompts + FID, CLIP, speed: [MODEL=lumina_mgpt COCO=/data/coco SET=coco2014_30k NPROC=8 SJD2_PATH=export/]
	$(PY) -m bench.eval_suite --set $(or $(SET),$(COCO_SET)) $(SUITE_ARGS)

eval-geneval: install ## AR/SJD/SJD2 on GenEval prompts + GenEval score (tiny: the shapes set through the same rules)
	$(PY) -m bench.eval_suite --set $(or $(SET),$(GENEVAL_SET)) $(SUITE_ARGS)

geneval-prompts: ## fetch GenEval's 553 prompts (MIT) into data/geneval/ (needs network; not committed)
	mkdir -p data/geneval && curl -fsSL -o data/geneval/evaluation_metadata.jsonl \
		https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl

clean: ## remove run outputs (keeps .venv and committed weights)
	rm -rf outputs multirun runs
