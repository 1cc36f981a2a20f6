fn main() {
    println!("sd3");
}
