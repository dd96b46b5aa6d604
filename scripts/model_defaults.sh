# Sourced by bash_train.sh and bash_parallel_train.sh with their arguments: which model they
# train (--model toy, the default, or transformer: the toy GPT of transformer.py), its data
# directory and data file, and an lr it learns at in 200 iterations.
MODEL=toy
prev=
for arg in "$@"; do
    [ "$prev" = --model ] && MODEL=$arg
    case $arg in --model=*) MODEL=${arg#--model=} ;; esac
    prev=$arg
done
if [ "$MODEL" = transformer ]; then
    DATA_DIR=${DATA_DIR:-data_transformer}; DATA_FILE=tokens_train.npy; INIT_LR=0.01
else
    DATA_DIR=${DATA_DIR:-data}; DATA_FILE=xtrain.npy; INIT_LR=0.001
fi
